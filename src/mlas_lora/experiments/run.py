"""`mlas-lora run CONFIG.yaml`: every stage of an experiment, then the Table-1-style report.

Each system's hypotheses are written per split and direction under `RUN/hyps/`, keyed by a hash
of everything that produced them, so a re-run skips what is done and an interrupted run resumes.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlas_lora.config import config_hash, save_yaml, to_dict
from mlas_lora.data.records import Example
from mlas_lora.experiments.cells import find_by_content, find_cell, hypothesis_rows
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import Splits, load_splits, split_back
from mlas_lora.experiments.data_hash import combine_digests, rows_digest
from mlas_lora.experiments.stages import set_aside_name
from mlas_lora.experiments.systems import System, resolve_systems
from mlas_lora.stage_files import json_line, read_small_json, write_json_atomic, write_text_atomic
from mlas_lora.translation.generate import GREEDY_DECODER, translate

EVAL_SPLITS = ("valid", "test", "ood")
"""The translated splits, in order: valid (where hyper-parameters are chosen), then test and OOD."""
SPLIT_TITLES = {
    "valid": "Validation (for choosing hyper-parameters)",
    "test": "In-domain test (embedded / configured test split)",
    "ood": "Out-of-domain test",
}


def write_manifest(config: ExperimentConfig, run_dir: Path) -> None:
    """The resolved config and the versions that produced this run directory."""
    import torch
    import transformers

    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, run_dir / "config.yaml")
    manifest = {
        "config_hash": config_hash(config),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": config.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json_atomic(run_dir / "manifest.json", manifest)


class HypothesisStore:
    """Hypotheses of one system on one split and direction, cached as JSONL with the key that made them;
    given `archive` (a config's `cells`), cells the run folder lacks are taken from there (cells.py)."""

    def __init__(self, run_dir: Path, archive: Path | None = None):
        self.root = run_dir / "hyps"
        self.archive = archive

    def path(self, system: str, split: str, direction: str) -> Path:
        return self.root / system / f"{split}.{direction}.jsonl"

    def load(
        self,
        system: str,
        split: str,
        direction: str,
        key: str,
        content: str | None = None,
        examples=None,
        data: str | None = None,
    ) -> list[str] | None:
        """The system's cached hypotheses made under `key` (given `examples`, only if made from these
        very sources and references, and given `data`, from the rows its training or prompt read
        (data_hash.py): a corpus edited in place keeps its keys); failing those, with `content` and
        `examples`, another system's made under the same content key on the same segments (a lambda
        below 1/P, R-i and lora: one function under two names), copied to this system's file. Each is
        looked for in the run folder, then in the archive (given `examples`: its cells hold only their
        digest), whose cell is written into the run folder whole."""
        own = self.path(system, split, direction)
        rows = self._rows(own)
        if rows and rows[0].get("key") == key and _same_inputs(rows, examples, data):
            # a file from before content keys or rows' hashes: its key proves the inputs
            adopted = {k: v for k, v in (("content", content), ("data", data)) if v is not None}
            if any(rows[0].get(k) is None for k in adopted):
                rows[0].update(adopted)
                self._write(own, rows)
            return [row["hypothesis"] for row in rows[1:]]
        if examples is None:
            return None
        if (hyps := self._archived(system, split, direction, key, examples, content, data)) is not None:
            return hyps
        if content is None:
            return None
        for path in sorted(self.root.glob(f"*/{split}.{direction}.jsonl")):
            rows = self._rows(path)
            if rows and rows[0].get("content") == content and _same_inputs(rows, examples, data):
                hyps = [r["hypothesis"] for r in rows[1:]]
                copied = path.parent.name
                self.save(system, split, direction, key, examples, hyps, 0.0, content, copied, data)
                return hyps
        if self.archive is None:
            return None
        if found := find_by_content(self.archive, split, direction, content, examples, data):
            copied, cell = found
            self.save(system, split, direction, key, examples, cell["hypotheses"], 0.0, content, copied, data)
            return cell["hypotheses"]
        return None

    def _archived(self, system, split, direction, key, examples, content, data) -> list[str] | None:
        """The system's archived cell of `key` made from `examples` (cells.py), written into the run
        folder with its own header (the seconds it took, where it was copied from) and returned."""
        cell = self.archive and find_cell(self.archive, system, split, direction, key, examples, data)
        if not cell:
            return None
        header, hyps = cell["header"], cell["hypotheses"]
        content, data = (header.get(k) or v for k, v in (("content", content), ("data", data)))
        seconds, copied = header.get("seconds", 0.0), header.get("copied_from")
        self.save(system, split, direction, key, examples, hyps, seconds, content, copied, data)
        return hyps

    def _set_aside(self, system: str, split: str, direction: str, key: str) -> None:
        """Move the system's file made under another key to `hyps/<system>@<key[:8]>/`, where `load`'s
        content-key search still finds it: one name run under two configs (`run` and `experiment
        --budget cpu` both have a `zero-shot`) then keeps both instead of translating again each time."""
        path = self.path(system, split, direction)
        rows = self._rows(path)
        old = rows[0].get("key") if rows else None
        if old is not None and old != key:
            aside = self.path(set_aside_name(system, old), split, direction)
            aside.parent.mkdir(parents=True, exist_ok=True)
            path.replace(aside)

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        return hypothesis_rows(path)

    @staticmethod
    def _write(path: Path, rows: list[dict]) -> None:
        write_text_atomic(path, "".join(json_line(r) + "\n" for r in rows))

    def save(
        self,
        system: str,
        split: str,
        direction: str,
        key: str,
        examples,
        hyps,
        seconds: float,
        content: str | None = None,
        copied: str | None = None,
        data: str | None = None,
    ) -> None:
        path = self.path(system, split, direction)
        self._set_aside(system, split, direction, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"key": key, "seconds": round(seconds, 2)}
        if content is not None:
            header["content"] = content
        if copied is not None:
            header["copied_from"] = copied
        if data is not None:
            header["data"] = data
        rows = [header]
        rows += [
            {"source": e.source, "reference": e.reference, "hypothesis": h}
            for e, h in zip(examples, hyps, strict=True)
        ]
        self._write(path, rows)


def _same_inputs(rows: list[dict], examples, data: str | None) -> bool:
    """Whether a hypothesis file was made from `examples` (when given) and the rows hashing to `data`
    (when given; a header without the hash, an older version's, counts as made from them)."""
    segments = examples is None or _same_segments(rows, examples)
    return segments and (data is None or rows[0].get("data") in (None, data))


def _same_segments(rows: list[dict], examples) -> bool:
    """Whether a hypothesis file's rows hold exactly these examples' sources and references, in order."""
    return len(rows) == len(examples) + 1 and all(
        r.get("source") == e.source and r.get("reference") == e.reference
        for r, e in zip(rows[1:], examples, strict=True)
    )


# A system's translator: ({direction: examples}, split) -> {direction: hypotheses}. All directions of a
# split go through one `translate` call, so continuous batching keeps its batch full across them.
Translator = Callable[[dict[str, list[Example]], str], dict[str, list[str]]]


def prompting_translator(system: System, model, tokenizer, splits: Splits) -> Translator:
    """Translation by a prompting method (0-shot, in-context) with the untuned student."""

    def run(by_direction: dict[str, list[Example]], split: str) -> dict[str, list[str]]:
        requests = [
            r
            for examples in by_direction.values()
            for r in system.method.requests(examples, splits, system.config)
        ]
        hyps = translate(
            model,
            tokenizer,
            requests,
            system.config.generation,
            desc=f"{system.name} {split} {','.join(by_direction)}",
        )
        return split_back(by_direction, hyps)

    return run


def translate_all(
    system: str,
    make_translator: Callable[[], Translator],
    splits: Splits,
    store: HypothesisStore,
    keys: dict[str, tuple[str, str | None]],
    data: str | None = None,
):
    """Hypotheses for every evaluated split and direction, reusing cached ones (the system's own, or
    another system's of the same content key: `keys[split]` is (key, content key); made from the rows
    `data` hashes, when given); returns
    them, the seconds spent translating, and whether every cell was cached. `make_translator` runs
    once, at the first cell to translate (a
    system whose cells are all cached trains and loads nothing). A split's uncached directions are
    translated together; each cell's file records its share of the time, by segments."""
    outputs: dict[tuple[str, str], list[str]] = {}
    seconds = 0.0
    translator = None
    for split in EVAL_SPLITS:
        key, content = keys[split]
        todo: dict[str, list[Example]] = {}
        for direction, examples in splits.get(split).items():
            if not examples:
                continue
            hyps = store.load(system, split, direction, key, content, examples, data)
            if hyps is None:
                todo[direction] = examples
            else:
                outputs[(split, direction)] = hyps
        if not todo:
            continue
        translator = translator or make_translator()
        start = time.perf_counter()
        done = translator(todo, split)
        spent = time.perf_counter() - start
        seconds += spent
        total = sum(len(examples) for examples in todo.values())
        for direction, examples in todo.items():
            share = spent * len(examples) / total
            store.save(system, split, direction, key, examples, done[direction], share, content, data=data)
            outputs[(split, direction)] = done[direction]
    outputs = {cell: outputs[cell] for cell in _cells(splits) if cell in outputs}
    return outputs, seconds, translator is None


def _cells(splits: Splits) -> list[tuple[str, str]]:
    return [(split, direction) for split in EVAL_SPLITS for direction in splits.get(split)]


def evaluate_outputs(system: str, outputs, splits: Splits, config: ExperimentConfig):
    """Score every (split, direction) of one system: result records per split, and unavailable metrics."""
    from mlas_lora.evaluation.metrics import score_corpus
    from mlas_lora.evaluation.report import records_from_scores

    records: dict[str, list] = {}
    unavailable: dict[str, str] = {}
    for (split, direction), hyps in outputs.items():
        examples = splits.get(split)[direction]
        scores = score_corpus(
            hyps,
            [e.reference for e in examples],
            examples[0].tgt_lang,
            metrics=tuple(config.evaluation.metrics),
            sources=[e.source for e in examples],
            comet_model=config.evaluation.comet_model,
        )
        records.setdefault(split, []).extend(
            records_from_scores(system, direction, scores, config_hash(config))
        )
        unavailable.update({m: r.reason for m, r in scores.items() if not r.available})
    return records, unavailable


def significance(all_outputs, splits: Splits, config: ExperimentConfig, challenger: str) -> list[dict]:
    """Paired bootstrap of `challenger` against the configured baseline, per split and direction."""
    from mlas_lora.evaluation.metrics import paired_bootstrap

    baseline = config.evaluation.significance_baseline(list(all_outputs))
    if baseline not in all_outputs or challenger not in all_outputs or challenger == baseline:
        return []
    rows = []
    for (split, direction), hyps in all_outputs[challenger].items():
        examples = splits.get(split)[direction]
        for metric in ("bleu", "chrf"):
            result = paired_bootstrap(
                hyps,
                all_outputs[baseline][(split, direction)],
                [e.reference for e in examples],
                examples[0].tgt_lang,
                metric=metric,
                n_samples=config.evaluation.bootstrap_samples,
                seed=12345 + config.seed,
            )
            name = direction if split == "test" else f"{direction} ({split})"
            rows.append({"system_a": challenger, "system_b": baseline, "direction": name, **result})
    return rows


def load_student(config: ExperimentConfig):
    from mlas_lora.models.loading import load_model

    return load_model(config.models.student, dtype=config.models.dtype)


def system_translator(system: System, splits: Splits, run_dir: Path, cache: dict):
    """The translator of one system; trained systems run their stages first (skipped when done)."""
    if not system.method.trains:
        from mlas_lora.models.loading import load_model

        name = system.method.model(system.config)
        if cache.get("prompting", (None,))[0] != name:  # one untuned model in memory at a time
            cache.pop("prompting", None)
            cache["prompting"] = (name, load_model(name, dtype=system.config.models.dtype))
        model, tokenizer = cache["prompting"][1]
        return prompting_translator(system, model, tokenizer, splits)
    from mlas_lora.experiments.pipeline import trained_translator

    cache.pop("prompting", None)  # free the untuned model: trained systems load their own
    return trained_translator(system, splits, run_dir)


def hypothesis_data(system: System, splits: Splits) -> str | None:
    """The hash of the corpus rows a system's hypotheses depend on besides the segments translated
    (data_hash.py): its training's, or those of the splits its prompt reads (a prompting method's
    `reads`: in-context's shots); None when there are none."""
    from mlas_lora.experiments.pipeline import training_data

    if system.method.trains:
        return training_data(system, splits)
    reads = getattr(system.method, "reads", ())
    return combine_digests({split: rows_digest(splits.get(split)) for split in reads}) if reads else None


SPLIT_SIZES = {"valid": "valid_per_direction", "test": "test_per_direction", "ood": "ood_per_direction"}
"""Each evaluated split's size field: a split's hypothesis key leaves out the other splits' sizes."""


def system_key(system: System, split: str = "test") -> str:
    """What a system's hypotheses on `split` depend on; a change re-runs that system only."""
    return hypothesis_keys(system, split)[0]


def hypothesis_keys(system: System, split: str = "test") -> tuple[str, str]:
    """(`system_key`, content key) of the system's hypotheses on `split`: the content key is the
    system key without the system's name, equal for two names of one function (their hypotheses are
    shared, HypothesisStore.load). The other evaluated splits' sizes are left out (each split is
    translated on its own), so a longer test set translates the test set alone."""
    parts = _hypothesis_inputs(system)
    for other, field in SPLIT_SIZES.items():
        if other != split:
            del parts["data"][field]
    key = config_hash(parts)
    del parts["system"]
    return key, config_hash(parts)


def _hypothesis_inputs(system: System) -> dict:
    from mlas_lora.models.loading import key_dtype

    config = system.config
    parts = {
        "system": system.name,
        "method": system.method.name,
        "student": system.method.model(config) if not system.method.trains else config.models.student,
        "dtype": key_dtype(config.models.dtype),
        "generation": to_dict(config.generation),
        "data": {**config.data.train_settings(), **to_dict(config.data)},
        "seed": config.seed,
    }
    if config.data.train_directions is None:  # a field added later enters only when set
        del parts["data"]["train_directions"]
    for name in config.data.TARGET_FIELDS:  # a trained system's are in its train key, where they act
        del parts["data"][name]
    if not config.generation.prefix_cache:
        del parts["generation"]["prefix_cache"]
    precision = parts["generation"].pop("precision")  # changes no all-bf16 (untrained) model
    parts["generation"]["decoder"] = GREEDY_DECODER
    if system.method.trains:
        from mlas_lora.experiments.pipeline import train_key

        parts.update(train=train_key(system), merge=config.evaluation.merge, precision=precision)
    return parts


def run_experiment(config: ExperimentConfig, force: bool = False, report_dir: Path | None = None) -> Path:
    """Run every system of the config, evaluate, and write results and `report.md`; returns the report path.

    Stages and hypotheses live in the run folder (`output_dir`); the results, significance and report
    go to `report_dir` (default: the run folder), so named experiments share one run's stages.
    """
    from mlas_lora.experiments.pipeline import check_stages

    systems = resolve_systems(config, open_models=("models", "comet"))
    run_dir = Path(config.output_dir)
    splits = load_splits(config.data)
    write_manifest(config, run_dir)  # only now: a run that fails on its config or data leaves no folder
    # --force translates again: the archive's cells are not taken either
    store = HypothesisStore(run_dir, Path(config.cells) if config.cells and not force else None)
    if force:
        import shutil

        shutil.rmtree(store.root, ignore_errors=True)
    all_outputs, timings, cache = {}, {}, {}
    for system in systems:
        keys = {split: hypothesis_keys(system, split) for split in EVAL_SPLITS}
        start = time.perf_counter()
        check_stages(system, splits, run_dir)  # stages behind cached hypotheses: made from these rows?
        # the translator (and its model) lives inside translate_all only: freed before the next system
        all_outputs[system.name], seconds, cached = translate_all(
            system.name,
            lambda system=system: system_translator(system, splits, run_dir, cache),
            splits,
            store,
            keys,
            hypothesis_data(system, splits),
        )
        timings[system.name] = {
            "translate_s": round(seconds, 1),
            "wall_s": round(time.perf_counter() - start, 1),
            "cached": cached,
        }
    return write_report(config, systems, run_dir, splits, all_outputs, timings, report_dir or run_dir)


def _timing_table(timings: dict, stages: dict) -> str:
    lines = ["| System | wall (s) | of which translation (s) | note |", "| --- | ---: | ---: | --- |"]
    for system, t in timings.items():
        note = "cached from an earlier run" if t["cached"] else ""
        lines.append(f"| {system} | {t['wall_s']:.1f} | {t['translate_s']:.1f} | {note} |")
    if stages:
        lines += ["", "| Stage | seconds |", "| --- | ---: |"]
        lines += [f"| {name} | {sec:.1f} |" for name, sec in stages.items()]
    return "\n".join(lines) + "\n"


def teacher_folders(system: System, run_dir: Path) -> dict[str, Path]:
    """The awareness, classes and transfer folders a system's init came from (empty if none)."""
    from mlas_lora.experiments.stages import awareness_keys, stage_folder, transfer_key

    if not system.method.trains or not system.method.needs_transfer(system.config):
        return {}
    scored, classes = awareness_keys(system.config)
    return {
        "awareness": stage_folder(run_dir, "awareness", scored),
        "classes": stage_folder(run_dir, "classes", classes),
        "transfer": stage_folder(run_dir, "transfer", transfer_key(system.config)),
    }


def method_diagnostics(folders: dict[str, Path]) -> str:
    """What the awareness and transfer stages found: layer selection, neuron classes, fill-ins, and
    how much each pair's init overlaps the general init."""
    if not folders:
        return ""
    meta = read_small_json(folders["classes"] / "classes.json")
    moved = read_small_json(folders["transfer"] / "transfer.json")
    if not (isinstance(meta, dict) and isinstance(moved, dict)):  # missing or unreadable: no section
        return ""
    total, pairs = meta["summary"]["total"], meta["pairs"]
    awareness = read_small_json(folders["awareness"] / "awareness.json")
    awareness = awareness if isinstance(awareness, dict) else {}
    lines = [
        "## What the teacher analysis found\n",
        f"Teacher layers kept (Eq. 1, reading `{awareness.get('relevance_reading', 'all')}`), in order onto "
        f"the student's: {list(moved['layer_map'].values())}.",
    ]
    by_reading = awareness.get("selected_layers_by_reading") or {}
    if len(by_reading) > 1:
        lines.append(
            "The same selection under every Eq. (1) reading: "
            + "; ".join(f"{name} {layers}" for name, layers in by_reading.items())
            + "."
        )
    if awareness.get("num_tokens"):
        lines.append(
            "Seed tokens scored per pair (Eq. 2): "
            + ", ".join(f"{p} {n}" for p, n in awareness["num_tokens"].items())
            + "."
        )
    neuron = meta["summary"].get("neuron", "each (matrix, side) coordinate of every scored layer")
    lines.append(
        f"Neurons (lambda {meta['lambda']}, Phi normalised per pair by `{meta.get('normalize', 'none')}`; "
        f"{neuron}): general {total['general']}, specific "
        + ", ".join(f"{p} {total['specific'][p]}" for p in pairs)
        + "."
    )
    if meta["lambda"] <= 1 / len(pairs):
        lines.append(
            f"Note: with {len(pairs)} pairs every neuron's largest share is at least 1/{len(pairs)} = "
            f"{1 / len(pairs):.2f} >= lambda, so no neuron can be general; the general LoRA is then "
            "initialised from the neurons of highest average awareness (the fill-in rule). The paper's "
            "lambda 0.2 was set for 14 pairs; `awareness.lam: auto` scales it to the number of pairs."
        )
    subs = moved["submatrices"].values()
    filled = sum(s["filled_rows"] + s["filled_cols"] for s in subs)
    chosen = sum(s["shape"][0] + s["shape"][1] for s in subs)
    energy = [s["energy_kept"] for s in subs]
    if moved.get("plan"):
        lines.append(f"Init plan (transfer/plan.py): {moved['plan']}.")
    lines.append(
        f"Rows/columns filled from outside their neuron set: {filled / chosen:.1%}; "
        f"SVD energy kept at rank r: mean {sum(energy) / len(energy):.3f}."
    )
    if table := overlap_table(moved):
        lines += ["", table]
    return "\n".join(lines) + "\n"


def overlap_table(transfer: dict) -> str:
    """Markdown table: per pair, the mean share of its init's rows / columns the general init also chose."""
    summary = transfer.get("overlap_with_general")
    if not summary:  # transfer.json written before overlaps were recorded
        return ""
    lines = [
        f"Overlap of each pair's init with the general init (fill rule `{transfer.get('fill_rule')}`; "
        "mean over layers and projections of the share of the pair's rows / columns):",
        "",
        "| pair | rows | cols |",
        "| --- | ---: | ---: |",
    ]
    for pair, by_proj in summary.items():
        rows, cols = (sum(v[axis] for v in by_proj.values()) / len(by_proj) for axis in ("rows", "cols"))
        lines.append(f"| {pair} | {rows:.1%} | {cols:.1%} |")
    return "\n".join(lines)


def write_report(
    config: ExperimentConfig,
    systems: list[System],
    run_dir: Path,
    splits: Splits,
    all_outputs,
    timings,
    report_dir: Path,
) -> Path:
    """results/{split}.json, significance.json, a Markdown report with Table-1-style tables, and the
    figures it names (figures/summary.png, figures/loss.png: plots.run_figures)."""
    from mlas_lora.evaluation.report import markdown_table, significance_table, write_results

    records: dict[str, list] = {}
    unavailable: dict[str, str] = {}
    names = [s.name for s in systems]
    for system, outputs in all_outputs.items():
        by_split, missing = evaluate_outputs(system, outputs, splits, config)
        for split, rows in by_split.items():
            records.setdefault(split, []).extend(rows)
        unavailable.update(missing)
    sections = [f"# {config.name}\n", f"Config hash `{config_hash(config)}`; run directory `{run_dir}`.\n"]
    for split, rows in records.items():
        write_results(rows, report_dir / "results" / f"{split}.json")
        n = {d: len(ex) for d, ex in splits.get(split).items()}
        sections.append(f"## {SPLIT_TITLES[split]}: segments per direction {n}\n")
        for metric in config.evaluation.metrics:
            if metric not in unavailable:
                sections.append(f"### {metric}\n\n" + markdown_table(rows, metric, names, list(n)))
    sections += [f"{metric}: unavailable ({reason})\n" for metric, reason in unavailable.items()]
    challengers = [s.name for s in systems if s.method.trains]
    comparisons = [row for c in challengers for row in significance(all_outputs, splits, config, c)]
    if comparisons:
        write_json_atomic(report_dir / "significance.json", comparisons)
        sections.append("## Paired bootstrap significance\n\n" + significance_table(comparisons))
    diagnosed = next((f for s in systems if (f := teacher_folders(s, run_dir))), {})
    sections.append(method_diagnostics(diagnosed))
    from mlas_lora.experiments.plots import run_figures

    sections.append(run_figures(report_dir, records, systems))
    from mlas_lora.experiments.distill import targets_report
    from mlas_lora.experiments.pipeline import training_folder

    distilled = [s for s in systems if s.method.trains and s.config.data.teacher_targets]
    if teacher_targets := targets_report({s.name: training_folder(s)[0] for s in distilled}):
        sections.append(teacher_targets)
    stages = read_small_json(run_dir / "stages.json")
    stages = stages if isinstance(stages, dict) else {}  # missing or cut: the table is left out
    sections.append("## Wall time (this invocation)\n\n" + _timing_table(timings, stages))
    return write_text_atomic(report_dir / "report.md", "\n".join(sections))
