"""The MLAS-LoRA stages of an experiment, each a library call that writes a folder of the run:

    awareness/  Eq. (1)-(2) on the teacher's seed sentences     (score_teacher)
    classes/    general vs specific neurons, lambda (Sec. 3.1)   (classify_neurons)
    transfer/   Eq. (4)-(5) submatrices -> Eq. (7)-(8) SVD factors (run_transfer)
    train-<system>/  Eq. (9) routed multi-LoRA fine-tuning, checkpoints, resume
    adapters/   one PEFT LoRA adapter per pair                  (export_peft_adapters)

A folder holds `stage.json` with the hash of everything its stage read; a stage whose hash is
unchanged is skipped, so a re-run or an interrupted run only does what is missing.
The plain `lora` baseline is one PEFT LoRA of rank r_gen + r_spe over all pairs, with the same
targets, scaling, data and steps, randomly initialised (PEFT's default).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from mlas_lora.config import config_hash, to_dict
from mlas_lora.experiments.config import DataConfig, ExperimentConfig, LoraConfig
from mlas_lora.experiments.data import Splits
from mlas_lora.models.arch import PROJECTION_PATHS, describe

SEED_DATA_FIELDS = ("corpus", "split_names", "directions", "seed_per_direction")
"""The data settings the awareness stage reads (the seed sentences); train / test sizes are not."""

CLASSIFY_ONLY = ("lam", "normalize")
"""Awareness settings only the classify stage reads: changing them does not re-score the teacher."""

EVAL_DATA_FIELDS = (
    "valid_per_direction",
    "test_per_direction",
    "ood_per_direction",
    "min_test_words",
    "shots",
    "test_corpus",
    "test_split",
)
"""The data settings only evaluation reads: changing them re-runs no training stage."""


def seed_data_settings(data: DataConfig) -> dict:
    """The data settings that pick the seed sentences: the data part of the awareness stage's key.

    `sample` and `seed` enter only where they act (a non-embedded corpus, or a data seed other than
    0), so the keys of embedded runs made before those fields existed stay valid.
    """
    settings = {k: v for k, v in to_dict(data).items() if k in SEED_DATA_FIELDS}
    if data.corpus != "embedded":
        settings.update(sample=data.sample, seed=data.seed)
    elif data.seed != 0:
        settings["seed"] = data.seed
    return settings


def stage_key(**parts) -> str:
    return config_hash(parts)


def stage_done(folder: Path, key: str) -> bool:
    marker = folder / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def mark_done(folder: Path, key: str, seconds: float) -> None:
    (folder / "stage.json").write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}))
    record_stage_time(folder.parent, folder.name, seconds)


def record_stage_time(run_dir: Path, name: str, seconds: float) -> None:
    path = run_dir / "stages.json"
    stages = json.loads(path.read_text()) if path.is_file() else {}
    stages[name] = round(seconds, 1)
    path.write_text(json.dumps(stages, indent=2))


def _fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def model_source(name: str):
    """A checkpoint folder to read lazily (embedded or local), else the loaded model (hub id)."""
    from mlas_lora.models.loading import load_model, resolve_source

    source, local = resolve_source(name)
    return source if local else load_model(name, dtype="float32")[0]


def awareness_stage(config: ExperimentConfig, splits: Splits, run_dir: Path) -> tuple[Path, Path]:
    """Score the teacher on each pair's seed sentences, then classify the neurons."""
    from mlas_lora.awareness.classify import classify_neurons, resolve_lambda, save_classes
    from mlas_lora.awareness.scoring import load_awareness, save_awareness, score_teacher
    from mlas_lora.models.loading import load_config, load_model, resolve_source

    scored, classes = run_dir / "awareness", run_dir / "classes"
    seeds = seed_data_settings(config.data)
    key = stage_key(
        teacher=config.models.teacher,
        student=config.models.student,
        dtype=config.models.dtype,
        data=seeds,
        awareness={k: v for k, v in to_dict(config.awareness).items() if k not in CLASSIFY_ONLY},
    )
    lam = resolve_lambda(config.awareness.lam, len(config.data.directions))
    classes_key = stage_key(scores=key, lam=lam, normalize=config.awareness.normalize)
    scores = None
    if not stage_done(scored, key):
        start = time.perf_counter()
        student_layers = describe(load_config(*resolve_source(config.models.student))).num_layers
        teacher, tokenizer = load_model(config.models.teacher, dtype=config.models.dtype)
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
        _fresh(scored)
        save_awareness(scores, scored)
        mark_done(scored, key, time.perf_counter() - start)
    if not stage_done(classes, classes_key):
        start = time.perf_counter()
        _fresh(classes)
        if scores is None:  # scoring was skipped: read its files
            scores = load_awareness(scored)
        save_classes(classify_neurons(scores, lam=lam, normalize=config.awareness.normalize), classes)
        mark_done(classes, classes_key, time.perf_counter() - start)
    return scored, classes


def transfer_stage(config: ExperimentConfig, splits: Splits, run_dir: Path):
    """Extract student-shaped teacher submatrices and their SVD factors (reads the teacher lazily)."""
    from mlas_lora.transfer.transfer import load_factors, run_transfer

    scored, classes = awareness_stage(config, splits, run_dir)
    folder = run_dir / "transfer"
    lora = config.lora
    key = stage_key(
        classes=json.loads((classes / "stage.json").read_text())["key"],
        r_gen=lora.r_gen,
        r_spe=lora.r_spe,
        targets=list(lora.targets),
        fill_rule=lora.fill_rule,
    )
    if not stage_done(folder, key):
        start = time.perf_counter()
        _fresh(folder)
        run_transfer(
            model_source(config.models.teacher),
            model_source(config.models.student),
            scored,
            classes,
            folder,
            list(splits.dev),
            config.lora.r_gen,
            config.lora.r_spe,
            tuple(config.lora.targets),
            fill_rule=lora.fill_rule,
        )
        mark_done(folder, key, time.perf_counter() - start)
    return load_factors(folder)


def _train_examples(splits: Splits) -> list:
    return [example for examples in splits.train.values() for example in examples]


def _bf16(model) -> bool:
    return next(model.parameters()).dtype == torch.bfloat16


def effective_lora(system: str, config: ExperimentConfig) -> LoraConfig:
    """The LoRA settings of a system: `mlas-lora-add` / `-residual` force the init mode."""
    mode = system.removeprefix("mlas-lora-")
    return replace(config.lora, init_mode=mode) if mode in ("add", "residual") else config.lora


def routed_student(config: ExperimentConfig, lora: LoraConfig, pairs: list[str], factors=None):
    """The student with general + per-pair LoRAs (Eq. 9), initialised from teacher factors if given."""
    from mlas_lora.adapters.routed_lora import attach_routed_lora, init_from_factors
    from mlas_lora.models.loading import load_model

    model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
    routed = attach_routed_lora(
        model,
        pairs,
        tuple(lora.targets),
        lora.r_gen,
        lora.r_spe,
        lora.alpha_gen,
        lora.alpha_spe,
        lora.dropout,
    )
    if factors is not None:
        init_from_factors(routed, factors, mode=lora.init_mode, teacher_scale=lora.teacher_scale)
    return routed, tokenizer


def peft_student(config: ExperimentConfig):
    """The plain LoRA baseline: one PEFT LoRA of rank r_gen + r_spe shared by every pair."""
    from peft import LoraConfig, get_peft_model

    from mlas_lora.models.loading import load_model

    model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
    rank = config.lora.r_gen + config.lora.r_spe
    modules = [PROJECTION_PATHS[t].split(".")[-1] for t in config.lora.targets]
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=rank * config.lora.alpha_gen / config.lora.r_gen,
        lora_dropout=config.lora.dropout,
        target_modules=modules,
    )
    torch.manual_seed(config.training.seed)
    return get_peft_model(model, peft_config, autocast_adapter_dtype=True), tokenizer


def _adapter_io(model, routed: bool) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    if routed:
        from mlas_lora.adapters.export import load_routed, save_routed

        return (lambda path: save_routed(model, path)), (lambda path: load_routed(model, path))
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save(path: Path) -> None:
        save_file(get_peft_model_state_dict(model), str(path / "adapter_model.safetensors"))

    def load(path: Path) -> None:
        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))

    return save, load


def _update_norms(model, routed: bool) -> Callable[[], dict[str, float]]:
    """||Delta W|| / ||W|| per pair (routed) or of the one LoRA, logged every step (Trainer.history)."""
    from mlas_lora.adapters.update_norms import peft_update_norms, routed_update_norms

    return routed_update_norms(model) if routed else peft_update_norms(model)


def train_key(system: str, config: ExperimentConfig) -> str:
    """What a training stage depends on: everything but the evaluation-only data settings."""
    return stage_key(
        system=system,
        models=to_dict(config.models),
        data={k: v for k, v in to_dict(config.data).items() if k not in EVAL_DATA_FIELDS},
        lora=to_dict(effective_lora(system, config)),
        training=to_dict(config.training),
        awareness=to_dict(config.awareness),
    )


def initial_student(system: str, config: ExperimentConfig, splits: Splits, run_dir: Path):
    """A trained system's student before its first step: (model, tokenizer, routed?).

    MLAS-LoRA systems run the teacher stages first (skipped when done) and start from their factors.
    """
    routed = system.startswith("mlas-lora")
    if not routed:
        return (*peft_student(config), False)
    factors = transfer_stage(config, splits, run_dir) if system != "mlas-lora-random" else None
    return (*routed_student(config, effective_lora(system, config), list(splits.train), factors), True)


def train_stage(system: str, config: ExperimentConfig, splits: Splits, run_dir: Path):
    """Build and fine-tune one trained system; returns (model, tokenizer, batch_context or None)."""
    from mlas_lora.training.trainer import Trainer, newest_checkpoint

    pairs = list(splits.train)
    folder = run_dir / f"train-{system}"
    model, tokenizer, routed = initial_student(system, config, splits, run_dir)
    key = train_key(system, config)
    save, load = _adapter_io(model, routed)
    if stage_done(folder, key):
        load(newest_checkpoint(folder) / "adapters")
    else:
        started = folder / "key.json"
        if started.is_file() and json.loads(started.read_text())["key"] != key:
            shutil.rmtree(folder)  # checkpoints of another config must not be resumed
        folder.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"key": key}))
        start = time.perf_counter()
        model.train()
        trainer = Trainer(
            model,
            tokenizer,
            _train_examples(splits),
            pairs,
            config.training,
            folder,
            model.routing if routed else None,
            save,
            load,
            bf16=_bf16(model),
            update_norms=_update_norms(model, routed),
        )
        trainer.fit(resume="auto")
        mark_done(folder, key, time.perf_counter() - start)
    model.eval()
    if not routed:  # PEFT keeps the adapter unmerged unless asked (see evaluation.merge)
        return (model.merge_and_unload() if config.evaluation.merge == "weights" else model), tokenizer, None
    export_stage(model, config, run_dir / f"adapters-{system}")
    return model, tokenizer, model.routing


def _pair_scope(model, context, examples, merge: str = "none"):
    """How a trained system decodes a one-pair test set: routed and unmerged, or merged (`weights`).

    Unmerged (the default), the evaluated function is the trained one: the LoRA factors stay in
    float32 beside the frozen bfloat16 weights. `weights` folds the pair's update into the base
    weights for the set (base-model speed), where bfloat16 rounds a small update partly away.
    """
    pairs = {example.pair for example in examples}
    if context is None or len(pairs) != 1 or merge != "weights":
        return contextlib.nullcontext(), context
    return model.merged(pairs.pop()), None


def export_stage(model, config: ExperimentConfig, folder: Path, merge: bool = False) -> None:
    """One standard PEFT adapter per pair, for PeftModel / vLLM multi-LoRA serving."""
    from mlas_lora.adapters.export import export_peft_adapters
    from mlas_lora.models.loading import resolve_source

    start = time.perf_counter()
    _fresh(folder)
    export_peft_adapters(model, folder, resolve_source(config.models.student)[0], merge=merge)
    record_stage_time(folder.parent, folder.name, time.perf_counter() - start)


def trained_translator(system: str, splits: Splits, config: ExperimentConfig, run_dir: Path):
    """Train (or reload) a system, then translate with it: the experiment's Translator."""
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import translate

    model, tokenizer, context = train_stage(system, config, splits, run_dir)
    gen = config.generation

    def run(examples, split: str) -> list[str]:
        scope, batch_context = _pair_scope(model, context, examples, config.evaluation.merge)
        with scope:
            return translate(
                model,
                tokenizer,
                zero_shot_requests(examples),
                gen,
                batch_context=batch_context,
                desc=f"{system} {split} {examples[0].pair}",
            )

    return run
