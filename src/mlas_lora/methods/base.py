"""The two protocols a method implements: prompting an untuned student, or training one.

An experiment calls a trained method in this order: `problems` (before any stage runs),
`needs_transfer` (the runner then hands it the teacher factors) and `prerequisite` (the name of a
preset the runner trains first, in the same run, and hands over as `prior`: LoRA-Flow's per-pair
LoRAs), `build`, the trainer with `route` / `update_norms` / `save` / `load`, then `decode_scope` per
test set and `export`. `export_format` says what the export is: "peft" (folders that
`PeftModel.from_pretrained` loads as they are) or "safetensors" (the method's own files, for methods
PEFT does not have).
`train_key` names every setting its training reads, and nothing else, so a change elsewhere (a
lambda, the teacher) does not retrain it; `inputs` carries the keys of the earlier stages it used
(`{"transfer": key}` when it needed the teacher factors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mlas_lora.errors import MlasLoraError

if TYPE_CHECKING:
    from mlas_lora.data.records import Example
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.experiments.data import Splits
    from mlas_lora.transfer.transfer import Factors
    from mlas_lora.translation.generate import TranslationRequest


@dataclass
class Student:
    """A student model as a method built it, with its tokenizer."""

    model: Any
    tokenizer: Any


class PromptingMethod(Protocol):
    name: str
    trains: bool  # False

    def problems(self, config: ExperimentConfig) -> list[str]: ...

    def requests(
        self, examples: list[Example], splits: Splits, config: ExperimentConfig
    ) -> list[TranslationRequest]: ...


class TrainedMethod(Protocol):
    name: str
    trains: bool  # True
    export_format: str  # "peft" or "safetensors"

    def problems(self, config: ExperimentConfig) -> list[str]: ...

    def needs_transfer(self, config: ExperimentConfig) -> bool: ...

    def prerequisite(self, config: ExperimentConfig) -> str | None: ...

    def train_key(self, config: ExperimentConfig, inputs: dict) -> dict: ...

    def build(
        self, config: ExperimentConfig, pairs: list[str], factors: Factors | None, prior: Student | None
    ) -> Student: ...

    def route(self, student: Student) -> Callable | None: ...

    def update_norms(self, student: Student) -> Callable[[], dict[str, float]]: ...

    def save(self, student: Student, path: Path) -> None: ...

    def load(self, student: Student, path: Path) -> None: ...

    def for_evaluation(self, student: Student, merge: str) -> Student: ...

    def decode_scope(
        self, student: Student, examples: list[Example], merge: str
    ) -> tuple[AbstractContextManager, Callable | None]: ...

    def export(self, student: Student, config: ExperimentConfig, folder: Path, merge: bool) -> Path: ...

    def trainable_parameters(self, student: Student) -> int: ...


Method = PromptingMethod | TrainedMethod


def count_trainable(model) -> int:
    """Parameters the optimizer updates (requires_grad), each counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def copy_saved(target: dict, saved: dict, where: Path, what: str) -> None:
    """Copy the checkpoint tensors `saved` into the live tensors `target` (name -> tensor), in place,
    after checking that both hold the same names with the same shapes; a mismatch is one error naming
    the file `where`, `what` the model trains, and the first differences (nothing is copied then)."""
    import torch

    check_saved(target, saved, where, what)
    with torch.no_grad():
        for name, tensor in saved.items():
            target[name].copy_(tensor)


def check_saved(target: dict, saved: dict, where: Path, what: str) -> None:
    """Raise one error naming `where` unless `saved` holds exactly the names of `target`, with their
    shapes (`copy_saved`'s check, for loaders that copy in their own way)."""
    missing, unexpected = sorted(target.keys() - saved.keys()), sorted(saved.keys() - target.keys())
    reshaped = [
        f"{name} {tuple(saved[name].shape)} (model {tuple(target[name].shape)})"
        for name in sorted(saved.keys() & target.keys())
        if saved[name].shape != target[name].shape
    ]
    problems = [
        f"{label}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped))
        if names
    ]
    if problems:
        raise MlasLoraError(f"{where}: does not match {what}; " + "; ".join(problems))


def method_options(cls, config):
    """`config.options` as the method's own dataclass `cls`; unknown keys and bad types are one error."""
    from mlas_lora.config import config_from_dict

    return config_from_dict(cls, dict(config.options))


def options_problems(cls, config) -> list[str]:
    """`problems()` of a method whose only own settings are its options dataclass `cls`."""
    try:
        method_options(cls, config)
    except MlasLoraError as err:
        return [str(err)]
    return []


def student_key(name: str, config, dtype: str | None = None, training=None, **parts) -> dict:
    """The part of a training key every method shares: which student in which dtype, on which data,
    with which training settings (`training` when the method adjusts them); `parts` add its own."""
    from mlas_lora.models.loading import key_dtype

    return {
        "method": name,
        "student": config.models.student,
        "dtype": key_dtype(dtype or config.models.dtype),
        "data": config.data.train_settings(),
        **parts,
        "training": (training or config.training).key_settings(),
    }


class Standalone:
    """Defaults of a method that needs no earlier stage: no teacher factors, no prior training."""

    def prerequisite(self, config) -> None:
        return None

    def needs_transfer(self, config) -> bool:
        return False


class Unrouted:
    """Defaults of a method whose student needs no routing and has nothing to merge: it is trained
    and decoded as it is (`evaluation.merge` does not apply)."""

    def route(self, student) -> None:
        return None

    def for_evaluation(self, student, merge: str) -> Student:
        student.model.eval()
        return student

    def decode_scope(self, student, examples, merge: str):
        return contextlib.nullcontext(), None


class PeftFolders:
    """Save, load and export of a PEFT model as PEFT adapter folders (`adapter_config.json` +
    `adapter_model.safetensors`) that `PeftModel.from_pretrained` loads as they are."""

    export_format = "peft"

    def save(self, student, path: Path) -> None:
        student.model.save_pretrained(str(path))

    def load(self, student, path: Path) -> None:
        """PEFT's own load, after checking the file holds every tensor of the model's adapters, no
        other, in their shapes: PEFT skips a missing or misnamed tensor silently (the untrained LoRA
        would then be translated and exported as if trained)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from mlas_lora.stage_files import read_safetensors

        where = Path(path) / "adapter_model.safetensors"
        saved = read_safetensors(where, "save or copy the adapters again, or use an earlier checkpoint")
        check_saved(get_peft_model_state_dict(student.model), saved, where, "this PEFT model's adapters")
        set_peft_model_state_dict(student.model, saved)

    def export(self, student, config, folder: Path, merge: bool = False, **save_options) -> Path:
        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        for peft_config in student.model.peft_config.values():  # the hub id, not the cache path
            peft_config.base_model_name_or_path = base_model_id(config.models.student)
        # no embedding layer is trained; "auto" would ask the hub for the base model's vocabulary
        student.model.save_pretrained(str(folder), save_embedding_layers=False, **save_options)
        return folder
