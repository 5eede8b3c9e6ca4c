"""`mlas-lora experiment NAME CONFIG`: a named set of systems over the config's directions, with
tables shaped like the paper's and plots.

    table1   every method of Table 1 (0-shot, 5-shot, full-ft, P-tuning, Adapter, LoRA, MELoRA, AFLoRA,
             LSLo, LoRA-Flow, MLAS-LoRA), bootstrap vs MLAS-LoRA
    table2   MLAS-LoRA and the ten ablations of Table 2 (methods/presets.py), bootstrap vs MLAS-LoRA
    lambda   Fig. 5: MLAS-LoRA as lambda varies (0.05-0.6 in 8 steps, plus `auto`); one teacher pass
    pairs, transfer, family   Figs. 3, 2 and 4 (analyses.py: runs of their own)
    distill  beyond the paper: sequence- and token-level distillation of the teacher into LoRA and
             MLAS-LoRA, bootstrap vs LoRA and vs MLAS-LoRA, costs.md (distill_experiment.py)
    monolingual  beyond the paper: the gain as teacher-translated monolingual text is added (an analysis)
    NAME     any label with `--systems a,b,c`; or the config file's own name, for its systems
             (`experiment lr configs/sweeps/lr.yaml`; check_experiment_name refuses other names)

Stages and hypotheses live in the config's run folder, shared with `mlas-lora run`, so a finished
(system, split, direction) cell is never recomputed and a killed experiment continues; tables and
plots go to RUN/experiments/NAME/. A budget (BUDGETS) scales every system alike.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
from dataclasses import replace
from pathlib import Path

from mlas_lora.config import config_from_dict, merge_trees, to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.analyses import ANALYSES
from mlas_lora.experiments.budgets import BUDGETS
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods.presets import TABLE2
from mlas_lora.stage_files import write_json_atomic, write_text_atomic

TABLE1 = (
    "zero-shot",
    "in-context",
    "full-ft",
    "p-tuning",
    "adapter",
    "lora",
    "melora",
    "aflora",
    "lslo",
    "lora-flow",
    "mlas-lora",
)
"""Table 1's rows, in the paper's order."""

VERDICT = (
    "zero-shot",
    "in-context",
    "teacher",
    "lora",
    "lora-total",
    "pissa",
    "mlas-pissa",
    "R-a",
    "M-i",
    "mlas-lora",
)
"""The verdict's rows (with `--seeds`, default 3, for every trained one): the untuned student, the
teacher (the ceiling), LoRA at both budget rules, the PiSSA controls, two ablations and MLAS-LoRA;
the best tuned Table 1 baselines join with `--systems`."""

LAMBDAS = (0.05, 0.129, 0.207, 0.286, 0.364, 0.443, 0.521, 0.6)
"""Fig. 5's range in 8 even steps (rounded to 3 decimals), then `auto`."""

NAMED = ("table1", "table2", "verdict", "lambda", "distill", *ANALYSES)
"""The experiments with systems of their own; any other name needs `--systems` or a sweep file."""


def experiment_systems(name: str, systems: list[str] | None, lambdas=LAMBDAS) -> list | None:
    """The systems of a named experiment, the given ones, or None: the config's own (a sweep file)."""
    if systems:
        return list(systems)
    if name == "table1":
        return list(TABLE1)
    if name == "table2":
        return list(TABLE2)
    if name == "verdict":
        return list(VERDICT)
    if name == "distill":
        from mlas_lora.experiments.distill_experiment import DISTILL_SYSTEMS

        return list(DISTILL_SYSTEMS)
    if name == "lambda":
        points = [*lambdas, "auto"]
        return [{"name": f"lambda-{lam}", "preset": "mlas-lora", "awareness": {"lam": lam}} for lam in points]
    return None  # the config's own systems


def check_experiment_name(name: str, systems: list | None, config_file: str | os.PathLike) -> None:
    """Refuse a name that is none of NAMED unless it labels `--systems` or is the config file's own
    name (`experiment lr configs/sweeps/lr.yaml` runs the sweep file's systems), so that a typo such
    as `tabel1` is not run silently as the config's own systems."""
    if "/" in name or name in ("", ".", ".."):
        raise MlasLoraError(f"experiment name {name!r}: a non-empty name without '/', not '.' or '..'")
    if name in NAMED or systems or name == Path(config_file).stem:
        return
    close = difflib.get_close_matches(name, NAMED, n=1)
    raise MlasLoraError(
        f"unknown experiment {name!r}{f'; did you mean {close[0]!r}?' if close else ''} (known: "
        f"{', '.join(NAMED)}; any other name needs --systems a,b,c, or is a sweep file's own name: "
        f"experiment lr configs/sweeps/lr.yaml)"
    )


def budget_tree(tree: dict, budget: str | None, overrides: dict | None = None) -> dict:
    """A config tree with a budget's settings merged in (None: as it is), then the command line's
    `key=value` overrides, which win over the budget."""
    if budget is not None and budget not in BUDGETS:
        raise MlasLoraError(f"unknown budget {budget!r} (known: {', '.join(BUDGETS)})")
    merged = tree if budget is None else merge_trees(tree, BUDGETS[budget])
    return merge_trees(merged, overrides) if overrides else merged


def budget_caption(budget: str | None) -> str:
    """The budget's settings in words, for the caption of a table or plot made under it."""
    if budget is None:
        return "the config's own data, training and decoding settings (no --budget)"
    settings = "; ".join(
        f"{section}: " + ", ".join(f"{key} {value}" for key, value in values.items())
        for section, values in BUDGETS[budget].items()
    )
    return f"budget `{budget}` ({settings})"


def with_budget(
    config: ExperimentConfig, budget: str | None, overrides: dict | None = None
) -> ExperimentConfig:
    """The config as `experiment --budget` runs it (for `curve`, which reads those trainings)."""
    if budget is None and not overrides:
        return config
    return config_from_dict(ExperimentConfig, budget_tree(to_dict(config), budget, overrides))


def experiment_config(
    name: str,
    config: ExperimentConfig,
    systems: list | None,
    budget: str | None,
    seeds: int = 1,
    overrides: dict | None = None,
):
    """The config with the experiment's systems (and budget; each trained system `seeds` times). The
    significance baseline is MLAS-LoRA in table1, table2, verdict and family, `lambda-auto` (MLAS-LoRA
    as shipped) in lambda, else the config's where it is one of the systems, else MLAS-LoRA if present,
    else none."""
    from mlas_lora.experiments.systems import system_spec

    tree = budget_tree(to_dict(config), budget, overrides)
    if systems is not None:
        tree["systems"] = systems
    tree["systems"] = seed_names(list(tree["systems"]), config)
    if seeds != 1:
        tree["systems"] = expand_seeds(list(tree["systems"]), seeds, config)
    names = [system_spec(s)[0] for s in tree["systems"]]
    if name in ("table1", "table2", "verdict", "family"):  # family: Table 1's comparison on another student
        tree["evaluation"]["baseline_for_significance"] = "mlas-lora"
    elif name == "distill" and "lora" in names:  # and against mlas-lora in NAME/vs-mlas-lora/
        tree["evaluation"]["baseline_for_significance"] = "lora"
    elif name == "lambda" and systems is not None and "lambda-auto" in names:
        tree["evaluation"]["baseline_for_significance"] = "lambda-auto"  # MLAS-LoRA as shipped
    elif config.evaluation.significance_baseline(names) not in names:
        tree["evaluation"]["baseline_for_significance"] = "mlas-lora" if "mlas-lora" in names else None
    return config_from_dict(ExperimentConfig, tree)


def run_named_experiment(
    name: str,
    config: ExperimentConfig,
    systems: list[str] | None = None,
    budget: str | None = None,
    lambdas=LAMBDAS,
    focus: str = "en-de",
    student: str = "gemma3-270m",
    seeds: int = 1,
    overrides: dict | None = None,
    command: str | None = None,
) -> Path:
    """Run the experiment, then write its tables, plots and provenance.json; returns
    RUN/experiments/NAME/. `seeds` trains every trained system that many times (training.seed + 0 ..
    seeds - 1). `overrides` (a tree of the command line's key=value) are applied after the budget.
    `command` (the command line, provenance.command_line) is recorded in provenance.json."""
    from mlas_lora.experiments.provenance import experiment_provenance, now, write_provenance
    from mlas_lora.experiments.run import run_experiment
    from mlas_lora.experiments.systems import resolve_systems

    if "/" in name or name in ("", ".", ".."):
        raise MlasLoraError(f"experiment name {name!r}: a non-empty name without '/', not '.' or '..'")
    if name in ANALYSES and seeds != 1:
        raise MlasLoraError(f"--seeds applies to system tables, not to the {name} analysis")
    started = now()
    if name in ANALYSES:
        folder = run_analysis(name, config, systems, budget, focus, student, overrides)
        ran = with_budget(config, budget, overrides)
        write_provenance(folder, experiment_provenance(ran, name, budget, 1, command, started))
        return folder
    config = experiment_config(
        name, config, experiment_systems(name, systems, lambdas), budget, seeds, overrides
    )
    resolved = resolve_systems(config)
    folder = Path(config.output_dir) / "experiments" / name
    run_experiment(config, report_dir=folder)
    write_tables(config, resolved, folder)
    write_plots(name, config, resolved, folder)
    if name == "distill":
        from mlas_lora.experiments.distill_experiment import distill_costs

        write_tables_against(config, resolved, folder, "mlas-lora")
        write_text_atomic(folder / "costs.md", distill_costs(resolved))
    write_provenance(folder, experiment_provenance(config, name, budget, seeds, command, started))
    return folder


def write_tables_against(config: ExperimentConfig, systems, folder: Path, baseline: str) -> None:
    """The experiment's tables again with significance against `baseline`, in NAME/vs-BASELINE/ (the
    same results, linked); nothing when it is not a system or already the baseline."""
    names = [s.name for s in systems]
    if baseline not in names or config.evaluation.significance_baseline(names) == baseline:
        return
    other = folder / f"vs-{baseline}"
    other.mkdir(parents=True, exist_ok=True)
    if not (other / "results").exists():
        (other / "results").symlink_to(Path("..") / "results", target_is_directory=True)
    evaluation = replace(config.evaluation, baseline_for_significance=baseline)
    write_tables(replace(config, evaluation=evaluation), systems, other)


def run_analysis(name: str, config, systems, budget, focus: str, student: str, overrides=None) -> Path:
    """pairs, transfer or family (analyses.py) at the budget, into RUN/experiments/NAME/."""
    from mlas_lora.experiments import analyses
    from mlas_lora.experiments.systems import resolve_systems

    base = experiment_config(
        name, config, list((systems or TABLE1) if name == "family" else ["mlas-lora"]), budget, 1, overrides
    )
    ran = replace(base, models=replace(base.models, student=student)) if name == "family" else base
    resolve_systems(ran, open_models=("models", "comet"))  # each model opened before a folder is made
    folder = Path(config.output_dir) / "experiments" / name
    folder.mkdir(parents=True, exist_ok=True)
    caption = budget_caption(budget)
    if name == "pairs":
        analyses.run_pairs(base, folder, focus, caption)
    elif name == "transfer":
        analyses.run_transfer(base, folder, caption)
    elif name == "monolingual":
        from mlas_lora.experiments.distill_experiment import MONOLINGUAL_SYSTEMS, run_monolingual

        run_monolingual(base, folder, caption, systems or MONOLINGUAL_SYSTEMS)
    else:
        sub = analyses.run_family(base, folder, student, list(base.systems), caption)
        write_tables(sub, resolve_systems(sub), folder)
    return folder


def trainable_parameters(system) -> int | None:
    """What the system's training recorded (params.json of pipeline.training_folder: its own folder, or
    the finished training of its key under another name, whose hypotheses it reused), plus what its
    prerequisite trained (LoRA-Flow's per-pair LoRAs); 0 for a prompting method; None if not recorded."""
    from mlas_lora.experiments.pipeline import prior_system, recorded_parameters, training_folder

    if not system.method.trains:
        return 0
    own = recorded_parameters(training_folder(system)[0] / "params.json")  # None: missing or cut
    if own is None:
        return None
    if (prior := prior_system(system)) is None:
        return own
    before = trainable_parameters(prior)
    return None if before is None else own + before


SPLIT_ORDER = ("test", "ood", "valid")
"""The order of the splits in an experiment's tables.md."""

SEED_SUFFIX = re.compile(r"^(?P<base>.+)\.seed(?P<k>[0-9]+)$")
"""`NAME.seedK`: system NAME trained with its training.seed + K (`--seeds`)."""


def expand_seeds(entries: list, seeds: int, config: ExperimentConfig) -> list:
    """Every system once (its own name, its own training.seed), then, for K = 1 .. seeds - 1, each
    trained system again as `NAME.seedK` with training.seed + K: seed-major, so an interrupted run
    has whole seeds done. Prompting systems decode deterministically and appear once."""
    from mlas_lora.experiments.systems import system_spec
    from mlas_lora.methods import METHODS

    if seeds < 1:
        raise MlasLoraError(f"--seeds must be >= 1, got {seeds}")
    out = list(entries)
    named = {system_spec(entry)[0] for entry in entries}
    for k in range(1, seeds):
        for entry in entries:
            name, spec = system_spec(entry)
            if not METHODS[spec["method"]].trains or f"{name}.seed{k}" in named or SEED_SUFFIX.match(name):
                continue  # prompting, a seed given by name, or itself one seed of a system
            out.append(seeded(f"{name}.seed{k}", spec, k, config))
    return out


def seeded(name: str, spec: dict, k: int, config: ExperimentConfig) -> dict:
    """The system entry `name`: `spec` with its training.seed (or the config's) + k."""
    training = dict(spec.get("training", {}))
    training["seed"] = training.get("seed", config.training.seed) + k
    return {"name": name, **spec, "training": training}


def seed_names(entries: list, config: ExperimentConfig) -> list:
    """`NAME.seedK` given by name (e.g. `--systems lora,lora.seed1`) is system NAME with training.seed
    + K, as `--seeds` names it: a table of the seeds that are done, or one more seed of one system."""
    from mlas_lora.experiments.systems import system_spec

    out = []
    for entry in entries:
        match = SEED_SUFFIX.match(entry) if isinstance(entry, str) else None
        if match is None:
            out.append(entry)
            continue
        out.append(seeded(entry, system_spec(match["base"])[1], int(match["k"]), config))
    return out


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """Row name -> the systems it averages: NAME with its NAME.seedK, in order; others alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = SEED_SUFFIX.match(name)
        base = match["base"] if match and match["base"] in names else name
        groups.setdefault(base, []).append(name)
    return groups


def seed_significance(
    config: ExperimentConfig, groups: dict[str, list[str]], splits: list[str], directions: dict, trials: int
) -> list[dict]:
    """Every row against the baseline row, per split, direction and metric (BLEU, chrF++): paired
    approximate randomization stratified by seed (challenger seed K against baseline seed K, or
    against the baseline's one output), p-values Holm-corrected across the directions of one
    (row, split, metric)."""
    from functools import cache

    from mlas_lora.evaluation.seeds import holm, stratified_ar
    from mlas_lora.experiments.run import HypothesisStore

    baseline = config.evaluation.significance_baseline(list(groups))
    if baseline not in groups:
        return []
    store, rows = HypothesisStore(Path(config.output_dir)), []

    @cache  # the baseline's files serve every row and both metrics: each file is read once
    def _hyps(system: str, split: str, direction: str) -> tuple[list[str], list[str]]:
        saved = HypothesisStore._rows(store.path(system, split, direction))[1:]
        return [r["hypothesis"] for r in saved], [r["reference"] for r in saved]

    for row, members in groups.items():
        if row == baseline:
            continue
        for split in splits:
            for metric in ("bleu", "chrf"):
                family = []
                for direction in directions[split]:
                    strata, refs = [], None
                    for k, member in enumerate(members):
                        hyps_a, refs_a = _hyps(member, split, direction)
                        other = groups[baseline][k % len(groups[baseline])]
                        hyps_b, refs_b = _hyps(other, split, direction)
                        if not hyps_a or refs_a != refs_b:
                            break
                        strata.append((hyps_a, hyps_b))
                        refs = refs_a
                    else:
                        tgt = direction.split("-")[1]
                        result = stratified_ar(strata, refs, tgt, metric, trials, seed=12345 + config.seed)
                        family.append({"system_a": row, "system_b": baseline, "split": split,
                                       "direction": direction, **result})  # fmt: skip
                for item, adjusted in zip(family, holm([f["p_value"] for f in family]), strict=True):
                    item["p_holm"] = adjusted
                rows.extend(family)
    return rows


def write_tables(config: ExperimentConfig, systems, folder: Path) -> None:
    """table.{split}.{metric}.md / .csv for every evaluated split and metric (a system trained with
    several seeds is one row, mean ± sd), significance.seeds.json and choice.md."""
    from mlas_lora.evaluation.report import read_results
    from mlas_lora.experiments.tables import choice_on_valid, paper_table

    names = [s.name for s in systems]
    groups = seed_groups(names)
    params = {s.name: trainable_parameters(s) for s in systems}
    results = {path.stem: read_results(path) for path in sorted((folder / "results").glob("*.json"))}
    directions = {
        split: list(dict.fromkeys(r.direction for r in records)) for split, records in results.items()
    }
    comparisons = seed_significance(
        config, groups, list(results), directions, config.evaluation.bootstrap_samples
    )
    write_json_atomic(folder / "significance.seeds.json", comparisons)
    baseline = config.evaluation.significance_baseline(list(groups))
    summary = []
    for split in sorted(
        results, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER)
    ):
        records = results[split]
        sizes = {r.direction: r.n_segments for r in records}
        summary.append(f"## {split}: segments per direction {sizes}\n")
        for metric in sorted({r.metric for r in records}):
            md, rows = paper_table(records, metric, names, params, comparisons, split,
                                   baseline if baseline in groups else None, groups=groups)  # fmt: skip
            write_text_atomic(folder / f"table.{split}.{metric}.md", md)
            with open(folder / f"table.{split}.{metric}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
            summary.append(f"### {metric}\n\n{md}")
    write_text_atomic(folder / "tables.md", "\n".join(summary))
    if "valid" in results and "test" in results:
        means = {split: group_means(results[split], groups) for split in ("valid", "test")}
        write_text_atomic(folder / "choice.md", choice_on_valid(means["valid"], means["test"]))


def group_means(records, groups: dict[str, list[str]]) -> list:
    """One record per (row, direction, metric): the mean over the row's seeds."""
    from dataclasses import replace

    row_of = {member: row for row, members in groups.items() for member in members}
    cells: dict[tuple, list] = {}
    for r in records:
        if r.system in row_of:
            cells.setdefault((row_of[r.system], r.direction, r.metric), []).append(r)
    return [
        replace(rs[0], system=row, score=sum(r.score for r in rs) / len(rs))
        for (row, _, _), rs in cells.items()
    ]


def write_plots(name: str, config: ExperimentConfig, systems, folder: Path) -> None:
    """The lambda curve (lambda experiments), layer relevance and neuron counts (MLAS-LoRA's stages)."""
    from mlas_lora.experiments.plots import lambda_plot, neuron_plot, relevance_plot, seeds_plot
    from mlas_lora.experiments.run import teacher_folders

    run_dir = Path(config.output_dir)
    stages = next((f for s in systems if (f := teacher_folders(s, run_dir))), {})
    if stages and (stages["awareness"] / "awareness.json").is_file():
        relevance_plot(stages["awareness"], folder / "layer_relevance.png")
        neuron_plot(stages["classes"], folder / "neurons.png")
    if name == "lambda":
        lambda_plot(systems, folder, folder / "lambda.png")
    groups = seed_groups([s.name for s in systems])
    if name == "verdict" or any(len(members) > 1 for members in groups.values()):
        seeds_plot(folder, groups, folder / f"{name}.png")
