"""Train, reload and decode one system of an experiment through its method's protocol:

    transfer-<key>/    the teacher stages (stages.py), run first when the method needs them
    distill-<key>/     the teacher's translations of the rows read, when a system learns from them
                       (distill.py; train-<system>/targets.json says what was used and dropped)
    train-<system>/    fine-tuning: checkpoints, train_log.json, resume (training/trainer.py)
    adapters-<system>/ the method's export (one PEFT adapter per pair for MLAS-LoRA)

`train-<system>/stage.json` holds the hash of what the method's training read (`train_key`); a
finished folder of another system with the same hash is reused instead of training again (Table 2's
-R-i is the `lora` system: `train-R-i` becomes a link to `train-lora`), and a folder of another hash
is never resumed. Beside the key it holds `data`, the hash of the corpus rows read (`training_data`):
a training of the key made from other rows (a corpus edited in place) is set aside, not reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mlas_lora.data.records import Example
from mlas_lora.distributed import barrier, is_main_process
from mlas_lora.experiments.data import Splits, split_back
from mlas_lora.experiments.data_hash import (
    combine_digests,
    recorded_data,
    rows_digest,
    same_data,
    say_changed,
    seed_data,
    stale_name,
)
from mlas_lora.experiments.stages import (
    awareness_keys,
    finished_key,
    mark_done,
    record_stage_time,
    set_aside_name,
    stage_done,
    stage_folder,
    stage_key,
    stage_ready,
    transfer_key,
)
from mlas_lora.experiments.systems import System
from mlas_lora.methods import Student
from mlas_lora.stage_files import (
    read_small_json,
    replace_dir,
    restore_dir,
    write_json_atomic,
    write_text_atomic,
)
from mlas_lora.translation.generate import trains_under_autocast


def prior_system(system: System) -> System | None:
    """The system a method trains on top of (its `prerequisite`), resolved with this system's config."""
    from mlas_lora.experiments.systems import resolve_system

    name = system.method.prerequisite(system.config)
    if name is None:
        return None
    prior = resolve_system(name, system.config)
    return System(f"{system.name}.prior", prior.method, prior.config, prior.spec)


def train_key(system: System) -> str:
    """What the system's training read: its method's `train_key` with the earlier stages' keys."""
    inputs = {"transfer": transfer_key(system.config)} if system.method.needs_transfer(system.config) else {}
    if (prior := prior_system(system)) is not None:
        inputs["prior"] = train_key(prior)
    from mlas_lora.experiments.distill import key_parts

    return stage_key(**system.method.train_key(system.config, inputs), **key_parts(system.config))


def training_data(system: System, splits: Splits) -> str:
    """The hash of the corpus rows a system's training read (data_hash.py), walked as `train_key`
    walks its inputs: the training split, the seed sentences behind its teacher factors, its prior's."""
    parts = {"train": rows_digest(splits.train)}
    if system.method.needs_transfer(system.config):
        parts["seeds"] = seed_data(splits)
    if (prior := prior_system(system)) is not None:
        parts["prior"] = training_data(prior, splits)
    return combine_digests(parts)


def train_dir(system: System, run_dir: Path) -> Path:
    return run_dir / f"train-{system.name}"


def initial_student(system: System, splits: Splits, run_dir: Path) -> Student:
    """The system's student before its first step; the teacher stages run first when it needs them."""
    from mlas_lora.experiments.stages import transfer_stage

    config = system.config
    factors = transfer_stage(config, splits, run_dir)[0] if system.method.needs_transfer(config) else None
    prior = prior_system(system)
    trained = train_stage(prior, splits, run_dir) if prior is not None else None
    return system.method.build(config, list(splits.train), factors, trained)


def finished_checkpoint(folder: Path) -> Path:
    from mlas_lora.training.trainer import newest_checkpoint

    return newest_checkpoint(folder) / "adapters"


def _record_parameters(system: System, student: Student, folder: Path) -> None:
    """train-<system>/params.json: the trainable parameters, for the tables' Params column (written
    again where it is missing or unreadable)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.json"
    if recorded_parameters(path) is None:
        write_text_atomic(path, json.dumps({"trainable": system.method.trainable_parameters(student)}))


def recorded_parameters(path: Path) -> int | None:
    """The count a params.json holds; None when it is missing or unreadable (cut by a full disk)."""
    recorded = read_small_json(path)
    count = recorded.get("trainable") if isinstance(recorded, dict) else None
    return count if isinstance(count, int) else None


def _remove(folder: Path) -> None:
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)


def same_training(run_dir: Path, key: str, data: str | None = None) -> Path | None:
    """A finished training folder of this run with the same key (another system's), if any; given
    `data`, one made from those rows (or one from before the rows' hash was kept)."""
    for folder in sorted(run_dir.glob("train-*")):
        if folder.is_symlink() or not stage_done(folder, key):
            continue
        if data is None or recorded_data(folder / "stage.json") in (None, data):
            return folder
    return None


def training_folder(system: System) -> tuple[Path, str]:
    """(training folder, train key) of a system: its own folder, or the finished training of its key
    under another system's name (a sweep's `lora-lr1e-4` for the main config's `lora`)."""
    run_dir = Path(system.config.output_dir)
    key, folder = train_key(system), train_dir(system, run_dir)
    if finished_key(folder) != key and (same := same_training(run_dir, key)) is not None:
        return same, key
    return folder, key


def train_stage(system: System, splits: Splits, run_dir: Path) -> Student:
    """Build and fine-tune one system (or reload its finished training); returns the trained student."""
    from mlas_lora.experiments.distill import distill_teacher, training_examples
    from mlas_lora.training.trainer import Trainer

    method, config = system.method, system.config
    folder, key, data = train_dir(system, run_dir), train_key(system), training_data(system, splits)
    student = initial_student(system, splits, run_dir)
    if is_main_process():  # under `accelerate launch` one process prepares, the others wait
        set_aside_stale_training(folder, key, data)
        _prepare_train_dir(system, student, run_dir, folder, (key, data))
    barrier()
    if stage_done(folder, key):
        method.load(student, finished_checkpoint(folder))
        return student
    training = getattr(method, "training_config", lambda c: c.training)(config)  # a method may adjust (lr)
    # the split's rows, with the teacher's translations as targets where data.targets asks for them (a
    # stage of its own, timed apart from the training)
    examples, targets = training_examples(config, training, splits.train, run_dir)
    if targets is not None and is_main_process():
        write_json_atomic(folder / "targets.json", targets)
    start = time.perf_counter()
    student.model.train()
    trainer = Trainer(
        student.model,
        student.tokenizer,
        examples,
        list(splits.train),
        training,
        folder,
        method.route(student),
        lambda path: method.save(student, path),
        lambda path: method.load(student, path),
        bf16=trains_under_autocast(student.model),
        update_norms=method.update_norms(student),
        after_step=getattr(method, "after_step", None)
        and (lambda step, total: method.after_step(student, step, total)),
        teacher=distill_teacher(config) if training.distill.enabled else None,
    )
    trainer.fit(resume="auto", desc=f"train {system.name}")
    if is_main_process():
        mark_done(folder, key, time.perf_counter() - start, data)
    return student


def _park(folder: Path, key: str) -> None:
    """Move a training of another key than `key` out of the system's way, to `train-NAME@KEY8`: a
    finished one, where `same_training` finds it when that key comes back (a run alternating budgets
    retrains nothing), and an unfinished one with checkpoints, which a run of its key resumes
    (`_unpark`). A started training without a checkpoint holds nothing to keep and stays."""
    from mlas_lora.training.trainer import complete_checkpoints

    if folder.is_symlink() or not folder.is_dir():
        return
    finished = finished_key(folder)
    old = finished or started_key(folder)
    if old is None or old == key or (finished is None and not complete_checkpoints(folder)):
        return
    parked = folder.with_name(set_aside_name(folder.name, old))
    if stage_done(parked, old) and finished is None:
        return  # the finished training of that key is parked already; this one is its unfinished copy
    _remove(parked)
    folder.rename(parked)


def _unpark(folder: Path, key: str, data: str) -> None:
    """Move back an unfinished training of `key` that `_park` set aside, to resume it (if it was
    started on the same rows, `data`)."""
    parked = folder.with_name(set_aside_name(folder.name, key))
    free = not folder.exists() and not folder.is_symlink()
    if free and parked.is_dir() and not parked.is_symlink() and started_key(parked) == key:
        if all(recorded_data(parked / name) in (None, data) for name in (STARTED, "stage.json")):
            parked.rename(folder)


STARTED = "key.json"
"""A training folder's marker of the key it is training (written before the first step)."""

UNREADABLE = "unreadable"
"""`started_key` of a folder whose key.json cannot be read: a key no config has."""


def started_key(folder: Path) -> str | None:
    """The key of the training started in `folder` (finished or not); None if none was started, and
    UNREADABLE when its key.json is cut or garbled (its checkpoints are then never resumed)."""
    started = folder / STARTED
    if not started.is_file():
        return None
    recorded = read_small_json(started)
    key = recorded.get("key") if isinstance(recorded, dict) else None
    return key if isinstance(key, str) else UNREADABLE


def _prepare_train_dir(
    system: System, student: Student, run_dir: Path, folder: Path, stage: tuple[str, str]
) -> None:
    """Make `folder` ready to train into, or link it to a finished training of the same key and rows
    (`stage`: the key and the rows' hash)."""
    key, data = stage
    if not stage_done(folder, key):
        _park(folder, key)
        if (same := same_training(run_dir, key, data)) is not None:
            _remove(folder)
            folder.symlink_to(same.name)  # train-R-i -> train-lora: one training, both names
    if stage_done(folder, key):
        _record_parameters(system, student, folder)
        return
    if folder.is_symlink() or started_key(folder) not in (None, key):
        _remove(folder)  # a link, or another config's start without a checkpoint (`_park` kept the rest)
    _unpark(folder, key, data)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / STARTED, json.dumps({"key": key, "data": data}))
    _record_parameters(system, student, folder)


def set_aside_stale_training(folder: Path, key: str, data: str) -> None:
    """Adopt the training of `key` in `folder` (finished or started; data_hash.same_data) or, made
    from other rows than `data`, move it to `train-NAME@KEY8.data-DATA8` (a link to one is removed),
    with one line saying so: it is then neither reused nor resumed, and `same_training` finds it if
    those rows come back."""
    from mlas_lora.training.trainer import complete_checkpoints

    finished = finished_key(folder) == key
    if not finished and (
        folder.is_symlink() or started_key(folder) != key or not complete_checkpoints(folder)
    ):
        return  # not this key's, or a start without a checkpoint: nothing is reused
    marker = folder / ("stage.json" if finished else STARTED)
    if same_data(marker, data):
        return
    if folder.is_symlink():
        folder.unlink()
        return say_changed(folder, "not reused, the link removed")
    aside = folder.with_name(stale_name(folder.name, key, recorded_data(marker)))
    if stage_done(aside, key) and not finished:
        _remove(folder)  # an unfinished copy of a training set aside finished: nothing to keep
    else:
        _remove(aside)
        folder.rename(aside)
    say_changed(folder, f"set aside as {aside.name}, trained again")


def check_stages(system: System, splits: Splits, run_dir: Path) -> None:
    """Adopt, or find stale, every stage a trained system's hypotheses came from, before they are read
    (data_hash.py): its teacher stages, its prior's, its training. Loads and computes nothing."""
    if not system.method.trains:
        return
    config = system.config
    if system.method.needs_transfer(config):
        seeds = seed_data(splits)
        scored, classes = awareness_keys(config)
        for kind, key in (("awareness", scored), ("classes", classes), ("transfer", transfer_key(config))):
            stage_ready(stage_folder(run_dir, kind, key), key, seeds)
    if (prior := prior_system(system)) is not None:
        check_stages(prior, splits, run_dir)
    if is_main_process():
        set_aside_stale_training(train_dir(system, run_dir), train_key(system), training_data(system, splits))


def export_stage(system: System, student: Student, run_dir: Path, merge: bool = False) -> Path:
    """The method's export (PEFT adapter folders) into RUN/adapters-<system>: written beside it, then
    swapped in (`replace_dir`), so an interrupted export leaves the previous one whole."""
    start = time.perf_counter()
    final = run_dir / f"adapters-{system.name}"
    restore_dir(final)  # a swap killed halfway
    new = final.with_name(f".{final.name}.new")
    written = system.method.export(student, system.config, new, merge)
    replace_dir(new, final)
    folder = final / Path(written).relative_to(new)
    record_stage_time(run_dir, final.name, time.perf_counter() - start)
    return folder


def trained_translator(system: System, splits: Splits, run_dir: Path):
    """Train (or reload) a system, export it, then translate with it: the experiment's Translator."""
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import translate

    student = train_stage(system, splits, run_dir)
    student.model.eval()
    export_stage(system, student, run_dir)
    merge = system.config.evaluation.merge
    student = system.method.for_evaluation(student, merge)

    def decode(examples: list[Example], split: str, directions: str) -> list[str]:
        scope, batch_context = system.method.decode_scope(student, examples, merge)
        with scope:
            return translate(
                student.model,
                student.tokenizer,
                zero_shot_requests(examples),
                system.config.generation,
                batch_context=batch_context,
                desc=f"{system.name} {split} {directions}",
            )

    def run(by_direction: dict[str, list[Example]], split: str) -> dict[str, list[str]]:
        if merge != "none":  # a merged model serves one pair: one call per direction
            return {d: decode(examples, split, d) for d, examples in by_direction.items()}
        flat = [e for examples in by_direction.values() for e in examples]
        return split_back(by_direction, decode(flat, split, ",".join(by_direction)))

    return run
