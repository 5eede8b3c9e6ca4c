"""`lora`: one PEFT LoRA shared by every pair, randomly initialised (PEFT's default): Table 1's LoRA
row, which is also Table 2's -R-i. Rank r_gen + r_spe (what one pair's sample sees in MLAS-LoRA),
scaling alpha_gen / r_gen, the same targets, data and steps.

Checkpoints and the export are PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`) that `PeftModel.from_pretrained` loads as they are.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mlas_lora.methods.base import Standalone, Student, count_trainable, student_key
from mlas_lora.models.arch import PROJECTION_PATHS
from mlas_lora.stage_files import fresh_dir


def peft_config(lora):
    """PEFT's LoraConfig for the experiment's `lora` section."""
    from peft import LoraConfig

    rank = lora.r_gen + lora.r_spe
    return LoraConfig(
        r=rank,
        lora_alpha=rank * lora.alpha_gen / lora.r_gen,
        lora_dropout=lora.dropout,
        target_modules=[PROJECTION_PATHS[t].split(".")[-1] for t in lora.targets],
    )


class PeftLora(Standalone):
    name = "lora"
    trains = True
    export_format = "peft"

    def problems(self, config) -> list[str]:
        return []

    def train_key(self, config, inputs: dict) -> dict:
        lora = config.lora
        return student_key(
            self.name,
            config,
            lora={
                "r": lora.r_gen + lora.r_spe,
                "scaling": lora.alpha_gen / lora.r_gen,
                "dropout": lora.dropout,
                "targets": list(lora.targets),
            },
        )

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from peft import get_peft_model

        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        return Student(
            get_peft_model(model, peft_config(config.lora), autocast_adapter_dtype=True), tokenizer
        )

    def route(self, student):
        return None

    def update_norms(self, student):
        from mlas_lora.adapters.update_norms import peft_update_norms

        return peft_update_norms(student.model)

    def save(self, student, path: Path) -> None:
        student.model.save_pretrained(str(path))

    def load(self, student, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(student.model, load_file(str(Path(path) / "adapter_model.safetensors")))

    def for_evaluation(self, student, merge: str) -> Student:
        """Unmerged (PEFT as trained) unless `weights`: then merged into the base weights' dtype."""
        student.model.eval()
        if merge == "weights":
            return Student(student.model.merge_and_unload(), student.tokenizer)
        return student

    def decode_scope(self, student, examples, merge: str):
        return contextlib.nullcontext(), None

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.models.loading import base_model_id

        fresh_dir(folder)
        for peft_config in student.model.peft_config.values():  # the hub id, not the cache path
            peft_config.base_model_name_or_path = base_model_id(config.models.student)
        # no embedding layer is trained; "auto" would ask the hub for the base model's vocabulary
        student.model.save_pretrained(str(folder), save_embedding_layers=False)
        return folder

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (PeftLora(),)
