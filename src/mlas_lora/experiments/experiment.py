"""`mlas-lora experiment NAME CONFIG`: a named set of systems over the config's directions, with
tables shaped like the paper's and plots.

    table1   every method of Table 1 (0-shot, 5-shot, full-ft, P-tuning, Adapter, LoRA, MELoRA, AFLoRA,
             LSLo, LoRA-Flow, MLAS-LoRA), bootstrap vs MLAS-LoRA
    table2   MLAS-LoRA and the ten ablations of Table 2 (methods/presets.py), bootstrap vs MLAS-LoRA
    lambda   Fig. 5: MLAS-LoRA as lambda varies (0.05-0.6 in 8 steps, plus `auto`); one teacher pass
    pairs, transfer, family   Figs. 3, 2 and 4 (analyses.py: runs of their own)
    NAME     any label: the config's systems (e.g. a sweep file in configs/sweeps/), or `--systems a,b,c`

Stages and hypotheses live in the config's run folder, shared with `mlas-lora run`, so a finished
(system, split, direction) cell is never recomputed and a killed experiment continues; tables and
plots go to RUN/experiments/NAME/. A budget (BUDGETS) scales every system alike.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mlas_lora.config import config_from_dict, merge_trees, to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.analyses import ANALYSES
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods.presets import TABLE2

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

LAMBDAS = (0.05, 0.129, 0.207, 0.286, 0.364, 0.443, 0.521, 0.6)
"""Fig. 5's range in 8 even steps (rounded to 3 decimals), then `auto`."""

BUDGETS: dict[str, dict] = {
    # Every system trained and evaluated alike on 2 CPU cores: 11 systems of table2 in an afternoon.
    "cpu": {
        "data": {"train_per_direction": 2000, "seed_per_direction": 32, "valid_per_direction": 50,
                 "test_per_direction": 100, "ood_per_direction": 0},
        "training": {"max_steps": 48, "micro_batch": 8, "grad_accum": 2, "checkpoint_every": 16},
    },
    # The analyses' (pairs, transfer, family: 6, 4 and 8 trainings of their own) on 2 CPU cores: the cpu
    # budget's data and decoding, a third of its steps, 50 test segments per direction, no validation.
    "cpu-small": {
        "data": {"train_per_direction": 2000, "seed_per_direction": 32, "valid_per_direction": 0,
                 "test_per_direction": 50, "ood_per_direction": 0},
        "training": {"max_steps": 16, "micro_batch": 8, "grad_accum": 2, "checkpoint_every": 8},
    },
    # The paper's setting (Sec. 4.1): 200k random pairs and 1k seeds per direction, batch 64, 3 epochs.
    "paper": {
        "data": {"train_per_direction": 200000, "seed_per_direction": 1000, "sample": "random",
                 "valid_per_direction": 200, "test_per_direction": None},
        "training": {"lr": 1.0e-4, "epochs": 3.0, "max_steps": None, "micro_batch": 8, "grad_accum": 8,
                     "checkpoint_every": 500},
    },
}  # fmt: skip


def experiment_systems(name: str, systems: list[str] | None, lambdas=LAMBDAS) -> list | None:
    """The systems of a named experiment, the given ones, or None: the config's own (a sweep file)."""
    if systems:
        return list(systems)
    if name == "table1":
        return list(TABLE1)
    if name == "table2":
        return list(TABLE2)
    if name == "lambda":
        points = [*lambdas, "auto"]
        return [{"name": f"lambda-{lam}", "preset": "mlas-lora", "awareness": {"lam": lam}} for lam in points]
    return None  # the config's own systems


def budget_tree(tree: dict, budget: str | None) -> dict:
    """A config tree with a budget's settings merged in (None: as it is)."""
    if budget is None:
        return tree
    if budget not in BUDGETS:
        raise MlasLoraError(f"unknown budget {budget!r} (known: {', '.join(BUDGETS)})")
    return merge_trees(tree, BUDGETS[budget])


def budget_caption(budget: str | None) -> str:
    """The budget's settings in words, for the caption of a table or plot made under it."""
    if budget is None:
        return "the config's own data, training and decoding settings (no --budget)"
    settings = "; ".join(
        f"{section}: " + ", ".join(f"{key} {value}" for key, value in values.items())
        for section, values in BUDGETS[budget].items()
    )
    return f"budget `{budget}` ({settings})"


def with_budget(config: ExperimentConfig, budget: str | None) -> ExperimentConfig:
    """The config as `experiment --budget` runs it (for `curve`, which reads those trainings)."""
    return (
        config if budget is None else config_from_dict(ExperimentConfig, budget_tree(to_dict(config), budget))
    )


def experiment_config(name: str, config: ExperimentConfig, systems: list | None, budget: str | None):
    """The config with the experiment's systems (and budget). The bootstrap baseline is MLAS-LoRA in
    table1, table2 and family, `lambda-auto` (MLAS-LoRA as shipped) in lambda, else the config's where it is one
    of the systems, else MLAS-LoRA if present, else none."""
    from mlas_lora.experiments.systems import system_spec

    tree = budget_tree(to_dict(config), budget)
    if systems is not None:
        tree["systems"] = systems
    names = [system_spec(s)[0] for s in tree["systems"]]
    if name in ("table1", "table2", "family"):  # family: Table 1's comparison on another student
        tree["evaluation"]["baseline_for_significance"] = "mlas-lora"
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
) -> Path:
    """Run the experiment, then write its tables and plots; returns RUN/experiments/NAME/."""
    from mlas_lora.experiments.run import run_experiment
    from mlas_lora.experiments.systems import resolve_systems

    if "/" in name or not name:
        raise MlasLoraError(f"experiment name {name!r}: a non-empty name without '/'")
    if name in ANALYSES:
        return run_analysis(name, config, systems, budget, focus, student)
    config = experiment_config(name, config, experiment_systems(name, systems, lambdas), budget)
    resolved = resolve_systems(config)
    folder = Path(config.output_dir) / "experiments" / name
    run_experiment(config, report_dir=folder)
    write_tables(config, resolved, folder)
    write_plots(name, config, resolved, folder)
    return folder


def run_analysis(name: str, config, systems, budget, focus: str, student: str) -> Path:
    """pairs, transfer or family (analyses.py) at the budget, into RUN/experiments/NAME/."""
    from mlas_lora.experiments import analyses
    from mlas_lora.experiments.systems import resolve_systems

    base = experiment_config(
        name, config, list((systems or TABLE1) if name == "family" else ["mlas-lora"]), budget
    )
    folder = Path(config.output_dir) / "experiments" / name
    folder.mkdir(parents=True, exist_ok=True)
    caption = budget_caption(budget)
    if name == "pairs":
        analyses.run_pairs(base, folder, focus, caption)
    elif name == "transfer":
        analyses.run_transfer(base, folder, caption)
    else:
        sub = analyses.run_family(base, folder, student, list(base.systems), caption)
        write_tables(sub, resolve_systems(sub), folder)
    return folder


def trainable_parameters(system) -> int | None:
    """What the system's training recorded (params.json of pipeline.training_folder: its own folder, or
    the finished training of its key under another name, whose hypotheses it reused); 0 for a
    prompting method; None if neither has recorded it."""
    from mlas_lora.experiments.pipeline import training_folder

    if not system.method.trains:
        return 0
    path = training_folder(system)[0] / "params.json"
    return json.loads(path.read_text())["trainable"] if path.is_file() else None


def write_tables(config: ExperimentConfig, systems, folder: Path) -> None:
    """table.{split}.{metric}.md / .csv for every evaluated split and metric."""
    from mlas_lora.evaluation.report import read_results
    from mlas_lora.experiments.tables import choice_on_valid, paper_table

    params = {s.name: trainable_parameters(s) for s in systems}
    sig_path = folder / "significance.json"
    comparisons = json.loads(sig_path.read_text()) if sig_path.is_file() else []
    for results in sorted((folder / "results").glob("*.json")):
        split, records = results.stem, read_results(results)
        for metric in sorted({r.metric for r in records}):
            md, rows = paper_table(
                records, metric, [s.name for s in systems], params, comparisons, split,
                config.evaluation.significance_baseline([s.name for s in systems]),
            )  # fmt: skip
            (folder / f"table.{split}.{metric}.md").write_text(md)
            with open(folder / f"table.{split}.{metric}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    valid, test = folder / "results" / "valid.json", folder / "results" / "test.json"
    if valid.is_file() and test.is_file():
        (folder / "choice.md").write_text(choice_on_valid(read_results(valid), read_results(test)))


def write_plots(name: str, config: ExperimentConfig, systems, folder: Path) -> None:
    """The lambda curve (lambda experiments), layer relevance and neuron counts (MLAS-LoRA's stages)."""
    from mlas_lora.experiments.plots import lambda_plot, neuron_plot, relevance_plot
    from mlas_lora.experiments.run import teacher_folders

    run_dir = Path(config.output_dir)
    stages = next((f for s in systems if (f := teacher_folders(s, run_dir))), {})
    if stages and (stages["awareness"] / "awareness.json").is_file():
        relevance_plot(stages["awareness"], folder / "layer_relevance.png")
        neuron_plot(stages["classes"], folder / "neurons.png")
    if name == "lambda":
        lambda_plot(systems, folder, folder / "lambda.png")
