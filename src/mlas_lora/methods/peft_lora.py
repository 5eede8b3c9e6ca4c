"""`lora`: one PEFT LoRA shared by every pair, randomly initialised (PEFT's default): Table 1's LoRA
row, which is also Table 2's -R-i. Rank r_gen + r_spe (what one pair's sample sees in MLAS-LoRA),
scaling alpha_gen / r_gen, the same targets, data and steps.

Checkpoints and the export are PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`) that `PeftModel.from_pretrained` loads as they are.
"""

from __future__ import annotations

import contextlib

import torch

from mlas_lora.methods.base import PeftFolders, Standalone, Student, count_trainable, student_key
from mlas_lora.models.arch import PROJECTION_PATHS


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


class PeftLora(Standalone, PeftFolders):
    name = "lora"
    trains = True

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

    def for_evaluation(self, student, merge: str) -> Student:
        """Unmerged (PEFT as trained) unless `weights`: then merged into the base weights' dtype."""
        student.model.eval()
        if merge == "weights":
            return Student(student.model.merge_and_unload(), student.tokenizer)
        return student

    def decode_scope(self, student, examples, merge: str):
        return contextlib.nullcontext(), None

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (PeftLora(),)
