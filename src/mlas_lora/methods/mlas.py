"""`mlas-lora`: the routed student of Eq. (9), initialised from the teacher (Eq. 4-8), and the
variants Table 2 ablates, which are data in its config (presets.py):

    lora.structure   mlas (general + per-pair) | shared (one LoRA) | per-pair (no general LoRA)
    lora.init        teacher (SVD factors of the transfer stage) | random (PEFT's init)
    lora.init_mode   add (W + teacher update) | residual (function-preserving at step 0)
    transfer.*       which teacher layers and neurons the inits are cut from (transfer/plan.py)

Checkpoints are `save_routed` folders (safetensors + manifest, resumable); the export is one PEFT
LoRA adapter folder per pair (adapters/export.py), for PeftModel and vLLM multi-LoRA serving.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mlas_lora.config import to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import Student, count_trainable


class MlasLora:
    name = "mlas-lora"
    trains = True
    export_format = "peft"

    def problems(self, config) -> list[str]:
        out = []
        lora = config.lora
        if lora.init != "teacher" and config.transfer.changed():
            out.append(f"transfer.* settings have no effect with lora.init: {lora.init}")
        if lora.init_mode == "residual" and lora.init == "random":
            out.append("lora.init_mode: residual needs lora.init: teacher (a random init starts at B = 0)")
        return out

    def prerequisite(self, config) -> None:
        return None

    def needs_transfer(self, config) -> bool:
        return config.lora.init == "teacher"

    def train_key(self, config, inputs: dict) -> dict:
        from mlas_lora.models.loading import key_dtype

        models = {**to_dict(config.models), "dtype": key_dtype(config.models.dtype)}
        if not self.needs_transfer(config):
            models.pop("teacher")
        return {
            "method": self.name,
            "models": models,
            "data": config.data.train_settings(),
            "lora": to_dict(config.lora),
            "training": config.training.key_settings(),
            **inputs,
        }

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.adapters.routed_lora import attach_routed_lora, init_from_factors
        from mlas_lora.adapters.structure import routed_shape
        from mlas_lora.models.loading import load_model

        lora, shape = config.lora, routed_shape(config.lora)
        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)  # the random factors (lora.init random, M-i) follow the seed
        routed = attach_routed_lora(
            model,
            pairs,
            tuple(lora.targets),
            shape.r_gen,
            shape.r_spe,
            shape.alpha_gen,
            shape.alpha_spe,
            lora.dropout,
        )
        if lora.init == "student":
            factors = student_factors(routed, shape.r_gen, shape.r_spe)
        if factors is not None:
            init_from_factors(routed, factors, mode=lora.init_mode, teacher_scale=lora.teacher_scale)
        return Student(routed, tokenizer)

    def route(self, student):
        return student.model.routing

    def update_norms(self, student):
        from mlas_lora.adapters.update_norms import routed_update_norms

        return routed_update_norms(student.model)

    def save(self, student, path: Path) -> None:
        from mlas_lora.adapters.export import save_routed

        save_routed(student.model, path)

    def load(self, student, path: Path) -> None:
        from mlas_lora.adapters.export import load_routed

        load_routed(student.model, path)

    def for_evaluation(self, student, merge: str) -> Student:
        student.model.eval()
        return student

    def decode_scope(self, student, examples, merge: str):
        """Routed and unmerged (the trained function, the default), or merged per pair (`weights`).

        Unmerged, the LoRA factors stay in float32 beside the frozen bfloat16 weights. `weights`
        folds the set's pair update into the base weights (base-model speed), where bfloat16 rounds a
        small update partly away. A model trained on one direction only decodes every direction with
        that direction's LoRAs (the transfer analysis of Fig. 2); one trained on several decodes a set
        of directions it was not trained on with its general LoRA alone (every pair LoRA's scaling 0).
        """
        pairs, trained = {example.pair for example in examples}, student.model.lora_config.pairs
        untrained = pairs - set(trained)
        if untrained and len(trained) == 1:  # trained on one direction (Fig. 2): its LoRAs serve every one
            (only,) = trained
            return contextlib.nullcontext(), lambda ids: student.model.routing([only] * len(ids))
        if untrained and untrained == pairs and student.model.lora_config.r_gen > 0:
            # directions it was not trained on (the verdict's unseen directions): the general LoRA alone
            only = trained[0]
            return general_only(student.model), lambda ids: student.model.routing([only] * len(ids))
        if untrained:
            raise MlasLoraError(
                f"{self.name}: no LoRA for {sorted(untrained)} (trained pairs: {list(trained)}; a set of "
                "only untrained directions is decoded with the general LoRA alone)"
            )
        if len(pairs) != 1 or merge != "weights":
            return contextlib.nullcontext(), student.model.routing
        return student.model.merged(pairs.pop()), None

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.adapters.export import export_peft_adapters
        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        export_peft_adapters(student.model, folder, base_model_id(config.models.student), merge=merge)
        return folder

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


@contextlib.contextmanager
def general_only(model):
    """Every pair LoRA switched off (its scaling 0, in every path and mode) for the duration."""
    layers = list(model.routed_layers().values())
    saved = [layer.scaling_spe for layer in layers]
    for layer in layers:
        layer.scaling_spe = 0.0
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved, strict=True):
            layer.scaling_spe = scaling


def student_factors(routed, r_gen: int, r_spe: int) -> dict:
    """`lora.init: student` (the `mlas-pissa` control): Eq. (8)'s factors from the SVD of the student's
    own weight W at every routed projection instead of a teacher submatrix: the general LoRA gets the
    top r_gen components (B = U S, A = V^T), every pair's LoRA the next r_spe (the same for every pair:
    the student's weights know no language), so general + pair hold the top r_gen + r_spe once."""
    from mlas_lora.transfer.svd_init import thin_svd

    factors = {}
    for key, layer in routed.routed_layers().items():
        u, s, vh = thin_svd(layer.base.weight.detach().to(torch.float32))
        blocks = {}
        if r_gen:
            blocks["general"] = ((u[:, :r_gen] * s[:r_gen]).contiguous(), vh[:r_gen].contiguous())
        if r_spe:
            end = r_gen + r_spe
            pair = ((u[:, r_gen:end] * s[r_gen:end]).contiguous(), vh[r_gen:end].contiguous())
            blocks.update({name: pair for name in layer.pairs})
        factors[key] = blocks
    return factors


METHODS = (MlasLora(),)
