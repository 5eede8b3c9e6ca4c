"""The teacher stages of an experiment, each a library call that writes a folder of the run:

    awareness-<key>/  Eq. (1)-(2) on the teacher's seed sentences     (score_teacher)
    classes-<key>/    general vs specific neurons, lambda (Sec. 3.1)   (classify_neurons)
    transfer-<key>/   Eq. (4)-(5) submatrices -> Eq. (7)-(8) SVD factors (run_transfer)

A folder is named by the hash of everything its stage read and holds `stage.json` with that hash, so
variants of a sweep keep their folders side by side and share what they have in common (the teacher
is scored once for every lambda; a classification serves every init that reads it). A folder of an
older run without the hash in its name (`awareness/`) is adopted when its key matches. `stage.json`
also holds `data`, the hash of the seed sentences read: a corpus edited in place keeps the key, and
a stage made from other rows is made again (`stage_ready`, data_hash.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlas_lora.config import config_hash, to_dict
from mlas_lora.distributed import barrier, is_main_process, main_process_first
from mlas_lora.experiments.config import DataConfig, ExperimentConfig
from mlas_lora.experiments.data import Splits
from mlas_lora.experiments.data_hash import same_data, say_changed, seed_data
from mlas_lora.models.arch import describe
from mlas_lora.stage_files import fresh_dir, read_small_json, write_json_atomic

SEED_DATA_FIELDS = ("corpus", "split_names", "directions", "seed_per_direction")
"""The data settings the awareness stage reads (the seed sentences); train / test sizes are not."""

CLASSIFY_ONLY = ("lam", "normalize")
"""Awareness settings only the classify stage reads: changing them does not re-score the teacher."""


def seed_data_settings(data: DataConfig) -> dict:
    """The data settings that pick the seed sentences: the data part of the awareness stage's key.

    `sample` and `seed` enter only where they act (a non-embedded corpus, or a data seed other than
    0), so the keys of embedded runs made before those fields existed stay valid.
    """
    settings = {k: v for k, v in to_dict(data).items() if k in SEED_DATA_FIELDS}
    if data.train_directions is not None:
        settings["directions"] = list(data.train_directions)
    if data.corpus != "embedded":
        settings.update(sample=data.sample, seed=data.seed)
    elif data.seed != 0:
        settings["seed"] = data.seed
    return settings


def stage_key(**parts) -> str:
    return config_hash(parts)


def finished_key(folder: Path) -> str | None:
    """The key of the finished stage `folder` holds; None if none (no or an unreadable marker)."""
    marker = folder / "stage.json"
    try:
        return json.loads(marker.read_text()).get("key") if marker.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def set_aside_name(name: str, key: str) -> str:
    """`NAME@KEY8`: where a training folder or a system's hypotheses made under another key go."""
    return f"{name}@{key[:8]}"


def stage_done(folder: Path, key: str) -> bool:
    """Whether `folder` holds a finished stage of this key (an unreadable marker: not finished)."""
    return finished_key(folder) == key


def stage_ready(folder: Path, key: str, data: str) -> bool:
    """`stage_done`, and made from the rows `data` hashes (`data_hash`): a stage of this key made from
    other rows (the corpus edited in place) loses its marker, with one line saying so, and is made
    again; a marker without the hash (an older version's) is adopted."""
    if not stage_done(folder, key):
        return False
    if same_data(folder / "stage.json", data):
        return True
    if is_main_process():
        (folder / "stage.json").unlink(missing_ok=True)
    say_changed(folder, "made again")
    return False


def mark_done(folder: Path, key: str, seconds: float, data: str | None = None) -> None:
    """Mark `folder` finished under `key`, with `data`, the hash of the corpus rows it read (if any)."""
    marker = {"key": key, "seconds": round(seconds, 1)}
    write_json_atomic(folder / "stage.json", marker if data is None else {**marker, "data": data})
    record_stage_time(folder.parent, folder.name, seconds)


def record_stage_time(run_dir: Path, name: str, seconds: float) -> None:
    path = run_dir / "stages.json"
    stages = read_small_json(path)
    stages = stages if isinstance(stages, dict) else {}  # missing, or cut by a kill: start again
    stages[name] = round(seconds, 1)
    write_json_atomic(path, stages)


def stage_folder(run_dir: Path, kind: str, key: str) -> Path:
    """`RUN/<kind>-<key[:8]>`; an older run's `RUN/<kind>` with the same key is renamed to it."""
    folder = run_dir / f"{kind}-{key[:8]}"
    legacy = run_dir / kind
    if not folder.exists() and stage_done(legacy, key):
        legacy.rename(folder)
    return folder


def model_source(name: str):
    """A checkpoint folder to read lazily (embedded or local), else the loaded model (hub id)."""
    from mlas_lora.models.loading import load_model, resolve_source

    source, local = resolve_source(name)
    return source if local else load_model(name, dtype="float32", device="cpu")[0]


def awareness_keys(config: ExperimentConfig) -> tuple[str, str]:
    """(scoring key, classes key): lambda and the normalisation enter only the second, lambda as the
    classification uses it (every lambda below 1/P classifies alike: one folder, one training)."""
    from mlas_lora.models.loading import key_dtype

    key = stage_key(
        teacher=config.models.teacher,
        student=config.models.student,
        dtype=key_dtype(config.models.dtype),
        data=seed_data_settings(config.data),
        awareness={k: v for k, v in to_dict(config.awareness).items() if k not in CLASSIFY_ONLY},
    )
    return key, stage_key(scores=key, lam=classes_lambda(config), normalize=config.awareness.normalize)


def classes_lambda(config: ExperimentConfig) -> float:
    """The lambda the classify stage uses and keys: resolved ('auto'), then `classification_lambda`."""
    from mlas_lora.awareness.classify import classification_lambda, resolve_lambda

    pairs = len(config.data.trained_directions)
    return classification_lambda(resolve_lambda(config.awareness.lam, pairs), pairs)


def awareness_stage(
    config: ExperimentConfig, splits: Splits, run_dir: Path, placement: dict | None = None
) -> tuple[Path, Path]:
    """Score the teacher on each pair's seed sentences, then classify the neurons; returns both folders.

    Under `accelerate launch` every process scores its shard on its own device and holds the summed
    scores; the main process writes them. `placement` ({"max_memory": ..., "offload_folder": ...},
    `load_model`'s arguments) spreads a teacher larger than one device (one process).
    """
    from mlas_lora.awareness.scoring import save_awareness, score_teacher
    from mlas_lora.models.loading import load_model, load_model_config, resolve_source

    key, classes_key = awareness_keys(config)
    scored, classes = stage_folder(run_dir, "awareness", key), stage_folder(run_dir, "classes", classes_key)
    scores, seeds = None, seed_data(splits)
    if not stage_ready(scored, key, seeds):
        start = time.perf_counter()
        student_layers = describe(load_model_config(*resolve_source(config.models.student))).num_layers
        teacher, tokenizer = load_model(config.models.teacher, dtype=config.models.dtype, **(placement or {}))
        scores = score_teacher(
            teacher,
            tokenizer,
            splits.dev,
            batch_size=config.awareness.batch_size,
            dtype=teacher.dtype,
            num_student_layers=student_layers,
            relevance_reading=config.awareness.relevance_reading,
            max_tokens=config.awareness.max_tokens,
        )
        del teacher
        if is_main_process():
            fresh_dir(scored)
            save_awareness(scores, scored)
            mark_done(scored, key, time.perf_counter() - start, seeds)
        barrier()
    with main_process_first():
        _classify_stage(config, scored, classes, classes_key, scores, seeds)
    return scored, classes


def _classify_stage(
    config: ExperimentConfig, scored: Path, classes: Path, classes_key: str, scores, seeds: str
) -> None:
    from mlas_lora.awareness.classify import classify_neurons, save_classes
    from mlas_lora.awareness.scoring import load_awareness

    if not stage_ready(classes, classes_key, seeds):
        start = time.perf_counter()
        fresh_dir(classes)
        if scores is None:  # scoring was skipped: read its files
            scores = load_awareness(scored)
        lam = classes_lambda(config)
        save_classes(classify_neurons(scores, lam=lam, normalize=config.awareness.normalize), classes)
        mark_done(classes, classes_key, time.perf_counter() - start, seeds)


def transfer_ranks(config: ExperimentConfig) -> tuple[int, int]:
    """(general rank, per-pair rank) of the inits to build; 0 = none (lora.structure)."""
    from mlas_lora.adapters.structure import routed_shape

    shape = routed_shape(config.lora)
    return shape.r_gen, shape.r_spe


def transfer_key(config: ExperimentConfig) -> str:
    """What the transfer stage reads; the InitPlan enters only where it differs from the paper's."""
    r_gen, r_spe = transfer_ranks(config)
    lora = config.lora
    parts = dict(
        classes=awareness_keys(config)[1],
        r_gen=r_gen,
        r_spe=r_spe,
        targets=list(lora.targets),
        fill_rule=lora.fill_rule,
    )
    if plan := config.transfer.changed():
        parts["plan"] = plan
    return stage_key(**parts)


def transfer_stage(config: ExperimentConfig, splits: Splits, run_dir: Path):
    """Extract student-shaped teacher submatrices and their SVD factors (reads the teacher lazily).

    Returns (factors, folder).
    """
    from mlas_lora.transfer.transfer import load_factors, run_transfer

    scored, classes = awareness_stage(config, splits, run_dir)
    key, seeds = transfer_key(config), seed_data(splits)
    folder = stage_folder(run_dir, "transfer", key)
    with main_process_first():  # the others find it done
        if not stage_ready(folder, key, seeds):
            start = time.perf_counter()
            fresh_dir(folder)
            r_gen, r_spe = transfer_ranks(config)
            run_transfer(
                model_source(config.models.teacher),
                model_source(config.models.student),
                scored,
                classes,
                folder,
                list(splits.dev),
                r_gen,
                r_spe,
                tuple(config.lora.targets),
                fill_rule=config.lora.fill_rule,
                plan=config.transfer,
            )
            mark_done(folder, key, time.perf_counter() - start, seeds)
    return load_factors(folder), folder
