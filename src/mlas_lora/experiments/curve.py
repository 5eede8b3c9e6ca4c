"""`mlas-lora curve CONFIG`: validation quality of trained systems at every saved checkpoint.

Training keeps a checkpoint every `training.checkpoint_every` steps; this re-loads each one (and the
untrained start, step 0) and translates the first `segments` validation segments of every direction,
so one can see at which step which system leads and whether a gap opens early or late. Validation
only: hyper-parameters are chosen there, never on test. Written into `RUN/curve/`:

    curve.json   {system: {step: {"bleu": avg, "chrf": avg, "seconds": s}}} + the settings that made it
    curve.csv    system, step, bleu, chrf, update_norm (mean ||Delta W|| / ||W|| logged at that step)
    curve.png    chrF++ and the relative update size against the step, one line per system

A (system, step) point already in curve.json with the same settings, validation segments and
training rows (`data`, data_hash.py) is not recomputed, so an interrupted curve continues.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from mlas_lora.config import config_hash
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import Splits, load_splits
from mlas_lora.experiments.systems import System, resolve_systems
from mlas_lora.stage_files import read_small_json, write_json_atomic


def checkpoints(folder: Path) -> dict[int, Path]:
    """step -> checkpoint folder, for the complete checkpoints of a training folder (with or without
    their training state: the adapters are what a curve point reads)."""
    from mlas_lora.training.trainer import complete_checkpoints

    return {int(path.name.removeprefix("step-")): path for path in complete_checkpoints(folder)}


def _score(hyps: dict, valid: dict) -> dict:
    from mlas_lora.evaluation.metrics import score_corpus

    scores = {
        d: score_corpus(hyps[d], [e.reference for e in ex], ex[0].tgt_lang, metrics=("bleu", "chrf"))
        for d, ex in valid.items()
    }
    return {m: sum(s[m].score for s in scores.values()) / len(scores) for m in ("bleu", "chrf")}


def _translate_valid(model, tokenizer, context, valid: dict, config: ExperimentConfig, label: str) -> dict:
    from mlas_lora.experiments.data import split_back
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import translate

    requests = [r for ex in valid.values() for r in zero_shot_requests(ex)]  # one call: a fuller batch
    hyps = translate(model, tokenizer, requests, config.generation, batch_context=context, desc=label)
    return split_back(valid, hyps)


def system_curve(system: System, splits: Splits, valid: dict, done: dict, folder: Path, key: str) -> dict:
    """{step: scores} of one system: step 0 (its initial student) and every saved checkpoint of its
    training `folder`, which must hold a training of `key` (`training_folder`) on the current rows."""
    from mlas_lora.experiments.data_hash import recorded_data
    from mlas_lora.experiments.pipeline import STARTED, initial_student, started_key, training_data
    from mlas_lora.experiments.stages import finished_key

    config = system.config
    run_dir = Path(config.output_dir)
    saved = checkpoints(folder)
    if not saved:
        raise MlasLoraError(f"{folder} has no checkpoints: train {system.name} first")
    trained = finished_key(folder) or started_key(folder)
    if trained != key:
        raise MlasLoraError(
            f"{folder} holds a training of another config (key {str(trained)[:8]}, this config's is "
            f"{key[:8]}): give curve the config, overrides and --budget it was trained with"
        )
    made_from = recorded_data(folder / "stage.json") or recorded_data(folder / STARTED)
    if made_from not in (None, training_data(system, splits)):
        raise MlasLoraError(
            f"{folder} was trained on other corpus rows (a file edited in place since): train "
            f"{system.name} again first (`mlas-lora run` or `mlas-lora train` sets the old one aside)"
        )
    student = initial_student(system, splits, run_dir)
    student.model.eval()
    context = system.method.route(student)
    points = dict(done)
    for step in [0, *saved]:
        if str(step) in points:
            continue
        if step:
            system.method.load(student, saved[step] / "adapters")
        start = time.perf_counter()
        hyps = _translate_valid(
            student.model, student.tokenizer, context, valid, config, f"{system.name} step {step}"
        )
        points[str(step)] = {**_score(hyps, valid), "seconds": round(time.perf_counter() - start, 1)}
    return points


def _update_norms(folder: Path) -> dict[int, float]:
    log = read_small_json(folder / "train_log.json")  # None: missing, or cut by a kill
    history = log.get("history", []) if isinstance(log, dict) else []
    return {
        r["step"]: sum(r["update_norm"].values()) / len(r["update_norm"])
        for r in history
        if r.get("update_norm")
    }


def learning_curve(config: ExperimentConfig, systems: list[str], segments: int = 25) -> Path:
    """Validation BLEU / chrF++ of each system at each checkpoint; returns the PNG's path."""
    from mlas_lora.experiments.data_hash import combine_digests, rows_digest
    from mlas_lora.experiments.pipeline import training_data, training_folder

    if segments < 1:
        raise MlasLoraError(f"segments must be >= 1, got {segments}")
    if not config.data.valid_per_direction:
        raise MlasLoraError("the learning curve needs a validation split: set data.valid_per_direction")
    resolved = {s.name: s for s in resolve_systems(config, open_models=("models",))}
    unknown = [s for s in systems if s not in resolved or not resolved[s].method.trains]
    if unknown:
        raise MlasLoraError(f"not trained systems of this config: {unknown} (systems: {list(resolved)})")
    run_dir = Path(config.output_dir)
    folder = run_dir / "curve"
    folder.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config.data, ("train", "dev", "valid"))
    valid = {d: ex[:segments] for d, ex in splits.valid.items() if ex}
    path = folder / "curve.json"
    stored = read_small_json(path)
    stored = stored if isinstance(stored, dict) else {}  # missing or cut: every point is computed again
    results = {}
    for system in systems:
        key = config_hash({"system": system, "segments": segments, "config": config_hash(config.key_tree())})
        data = combine_digests(
            {"valid": rows_digest(valid), "train": training_data(resolved[system], splits)}
        )
        done = stored.get(system, {})
        same = done.get("key") == key and done.get("data") in (None, data)  # none: an older version's
        points = done.get("points", {}) if same else {}
        training, trained = training_folder(resolved[system])
        results[system] = {
            "key": key,
            "data": data,
            "points": system_curve(resolved[system], splits, valid, points, training, trained),
            "folder": training.name,
        }
        stored[system] = results[system]
        write_json_atomic(path, stored)
    return write_curve(results, run_dir, segments)


def write_curve(results: dict, run_dir: Path, segments: int) -> Path:
    """curve.csv and curve.png from {system: {"points": {step: scores}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = run_dir / "curve"
    norms = {s: _update_norms(run_dir / d.get("folder", f"train-{s}")) for s, d in results.items()}
    with open(folder / "curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["system", "step", "bleu", "chrf", "update_norm"])
        for system, data in results.items():
            for step, p in sorted(data["points"].items(), key=lambda kv: int(kv[0])):
                norm = norms[system].get(int(step), 0.0 if step == "0" else "")
                writer.writerow([system, step, f"{p['bleu']:.2f}", f"{p['chrf']:.2f}", norm])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    for i, (system, data) in enumerate(results.items()):
        color = f"C{i}"  # one colour per system in both panels
        steps = sorted(int(s) for s in data["points"])
        top.plot(
            steps, [data["points"][str(s)]["chrf"] for s in steps], marker="o", label=system, color=color
        )
        if norms[system]:
            logged = sorted(norms[system])
            bottom.plot(logged, [norms[system][s] for s in logged], label=system, color=color)
    top.set_ylabel(f"valid chrF++ (avg., {segments} segments/direction)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("mean ||ΔW|| / ||W||")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = folder / "curve.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def leader_by_step(results: dict, metric: str = "chrf") -> list[tuple[int, str, float]]:
    """(step, leading system, its score) at every step all systems have."""
    steps = set.intersection(*(set(d["points"]) for d in results.values()))
    rows = []
    for step in sorted(steps, key=int):
        best = max(results, key=lambda s: results[s]["points"][step][metric])
        rows.append((int(step), best, results[best]["points"][step][metric]))
    return rows
