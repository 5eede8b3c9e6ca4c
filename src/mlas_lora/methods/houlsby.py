"""`adapter`: Houlsby et al. (2019) bottleneck adapters, two per layer: Table 1's Adapter row.

h + W_up GELU(W_down h + b1) + b2 after the attention output projection and after the MLP output,
before the residual add (before Gemma's post-attention / post-feedforward norms); the module is
adapters/bottleneck.py, which states the placement, the init (Houlsby's code: truncated normal, std
1e-3, zero biases: near identity) and the activation (GELU, tanh form). PEFT has no Houlsby adapter
and the `adapters` package pins an older transformers, hence our own small module.

Where ours differs from the original: the layer norms stay frozen (Houlsby trains them too), and
the size is chosen by parameter count. `options.bottleneck` (default None) sets m; None takes the m
whose 2 L (2 d m + m + d) trainable parameters come nearest MLAS-LoRA's at the same `lora` section
and pairs (adapters/budget.py): for Qwen2.5-0.5B (d 896, 24 layers) and 4 pairs at r_gen = r_spe = 8
that is m = 255 (21,989,328 parameters vs MLAS-LoRA's 21,995,520), inside Houlsby's range 8-256.
`options.init_scale` sets the init std.

Checkpoints and the export: `bottleneck.safetensors` + `bottleneck.json` (adapters/bottleneck.py);
`load_bottleneck` reloads them into a base model with `attach_bottleneck` of the same config.
The adapters are nonlinear, so there is nothing to merge: `evaluation.merge` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlas_lora.adapters.budget import budget_settings
from mlas_lora.config import to_dict
from mlas_lora.methods.base import Standalone, Student, Unrouted, count_trainable, method_options, student_key
from mlas_lora.stage_files import fresh_dir


@dataclass
class HoulsbyOptions:
    bottleneck: int | None = None
    """Adapter size m; None: the m nearest MLAS-LoRA's trainable parameters."""
    init_scale: float = 1e-3
    """Std of W_down and W_up at init (Houlsby's adapter-bert: 1e-3)."""


class HoulsbyAdapter(Standalone, Unrouted):
    name = "adapter"
    trains = True
    export_format = "safetensors"

    def problems(self, config) -> list[str]:
        options = method_options(HoulsbyOptions, config)
        out = []
        if options.bottleneck is not None and options.bottleneck < 1:
            out.append(f"options.bottleneck must be >= 1 (or null: matched), got {options.bottleneck}")
        if options.init_scale < 0:
            out.append(f"options.init_scale must be >= 0, got {options.init_scale}")
        return out

    def train_key(self, config, inputs: dict) -> dict:
        options = method_options(HoulsbyOptions, config)
        key = student_key(self.name, config, adapter=to_dict(options))
        if options.bottleneck is None:  # matched to MLAS-LoRA's parameters: the lora section sizes m
            key["budget"] = budget_settings(config.lora)
        return key

    def bottleneck(self, config, arch, n_pairs: int) -> int:
        from mlas_lora.adapters.bottleneck import matching_bottleneck
        from mlas_lora.adapters.budget import mlas_lora_parameters

        m = method_options(HoulsbyOptions, config).bottleneck
        if m is not None:
            return m
        budget = mlas_lora_parameters(arch, config.lora, n_pairs)
        return matching_bottleneck(arch.hidden_size, arch.num_layers, budget)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        import torch

        from mlas_lora.adapters.bottleneck import BottleneckConfig, attach_bottleneck
        from mlas_lora.models.arch import describe
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        shape = BottleneckConfig(
            self.bottleneck(config, describe(model), len(pairs)),
            method_options(HoulsbyOptions, config).init_scale,
        )
        torch.manual_seed(config.training.seed)
        return Student(attach_bottleneck(model, shape), tokenizer)

    def update_norms(self, student):
        """No weight update to measure (the adapters add a function, not a Delta W): nothing logged."""
        return lambda: {}

    def save(self, student, path: Path) -> None:
        from mlas_lora.adapters.bottleneck import save_bottleneck

        save_bottleneck(student.model, path)

    def load(self, student, path: Path) -> None:
        from mlas_lora.adapters.bottleneck import load_bottleneck

        load_bottleneck(student.model, path)

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.adapters.bottleneck import save_bottleneck
        from mlas_lora.models.loading import base_model_id

        fresh_dir(folder)
        save_bottleneck(student.model, folder, base_model=base_model_id(config.models.student))
        return folder

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (HoulsbyAdapter(),)
