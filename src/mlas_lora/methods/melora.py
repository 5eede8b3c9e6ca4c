"""`melora`: MELoRA (Ren et al., ACL 2024, "MELoRA: Mini-Ensemble Low-Rank Adapters for
Parameter-Efficient Fine-Tuning"), a Table 1 baseline. Each target projection gets n mini-LoRAs on
disjoint slices of its input and output, so its update is block-diagonal (Eq. 3 of the paper):

    y = W x + s diag(B_1 A_1, ..., B_n A_n) x,    A_i [r, d_in / n], B_i [d_out / n, r]

    x ──► W (frozen) ─────────────────────────────────────────────────┐
    └──► [x_1 | .. | x_n] ──► A_i x_i (bmm) ──► B_i (.) (bmm) ──► [y_1 | .. | y_n] · s ──► + ──► y

rank up to n r for r (d_in + d_out) parameters, the count of one LoRA of rank r. The dense update is
never formed: x is cut into its n slices and two batched matmuls apply the n mini-LoRAs. A_i is
kaiming-uniform and B_i zero (PEFT's LoRA init, per mini-LoRA), so the student starts at the base.
PEFT's BD-LoRA is not this method (it is block-diagonal in one factor only).

Official code followed: ChasonShi/MELoRA @ 4ebb8b4 (its own copy of PEFT 0.5.0):
  - peft-0.5.0/src/peft/tuners/melora.py:143-163 (`update_layer`: d_in and d_out divided by n, one
    nn.Linear pair per mini-LoRA on its slice, scaling alpha_i / r_i per mini-LoRA, A_i kaiming-uniform
    with a = sqrt(5) on its d_in / n inputs, B_i = 0) and :909-921 (`forward`: mini-LoRA i reads input
    slice i and writes output slice i, outputs concatenated): our MELoRALinear computes the same with
    two batched matmuls;
  - llama_finetune.py:195-207 (n copies of one rank and one alpha) and llama_finetune.sh:8, :14-16, :49
    (LLaMA-2-7B instruction tuning: mini rank 1, n = 8, alpha 16, so s = 16 per mini-LoRA, q_proj and
    v_proj, dropout 0.05, lr 3e-4).
That setting is the preset `melora` (methods/presets.py): Qwen2.5-0.5B, q (896 -> 896) and v
(896 -> 128), 1 x (1792 + 1024) = 2,816 parameters per layer, 67,584 in all, whatever the pairs.

The method's defaults (`options: {}`, the preset `melora-matched`, the first version's row) size it to
MLAS-LoRA instead: n = 8 and mini rank r = r_gen + P r_spe (P pairs) on every lora.target, so the
trainable count per projection, r (d_in + d_out), equals MLAS-LoRA's (r_gen + P r_spe)(d_in + d_out)
exactly (`budget_rank`): r = 40, 21,995,520 parameters for Qwen2.5-0.5B and 4 pairs at r_gen = r_spe =
8. For Qwen2.5-0.5B's k / v (896 -> 128: blocks 112 -> 16) a mini rank above 16 is rank-deficient per
block; the parameters are still spent, as the budget asks. Scaling s = lora.alpha_gen / lora.r_gen,
that of every LoRA in Table 1, unless `options.alpha` sets s = alpha / r.

Learning rate: `options.lr` when set (the preset `melora`: the official 3e-4), else training.lr.

Where ours differs from the official code:
  - Shapes. d_in and d_out of every target projection must be divisible by n; otherwise `build`
    raises one error naming every projection that is not (the code's integer division would leave
    the last d_in mod n inputs unread and fail to concatenate to d_out).
  - Dropout: one dropout on the input before it is cut into slices, where the code has one per
    slice: the same distribution (independent per element).
  - Training: the shared trainer (AdamW, its schedule), not the code's HF Trainer at batch 128.
  - Decoding is always unmerged (the trained float32 factors beside the base weights), whatever
    evaluation.merge says.

Checkpoints are `adapters/wrapped.py` folders (safetensors + manifest). The export is a PEFT LoRA of
rank n r (padded to vLLM's next rank): A = the A_i placed in their input slices (block rows), B =
s B_i placed in their output slices, so B A is the block-diagonal update, and PeftModel loads it as it is.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mlas_lora.adapters.budget import budget_rank
from mlas_lora.adapters.wrapped import (
    ProjectionAdapter,
    adapter_layers,
    export_peft,
    load_adapter,
    save_adapter,
    wrap_projections,
    wrapped_update_norms,
)
from mlas_lora.errors import MlasLoraError
from mlas_lora.methods.base import (
    Standalone,
    Student,
    Unrouted,
    count_trainable,
    method_options,
    options_problems,
    student_key,
)
from mlas_lora.models.arch import decoder_layers, projection

FORMAT = "mlas-lora-melora/1"


@dataclass
class MELoRAOptions:
    """MELoRA's settings, from a system's `options:` section."""

    n: int = 8
    """Mini-LoRAs per projection (the code's 8); every target's d_in and d_out must be divisible by it."""
    r: int | None = None
    """Rank of each mini-LoRA; None = r_gen + P r_spe, MLAS-LoRA's trainable count (the code: 1)."""
    alpha: float | None = None
    """s = alpha / r when set (the code's, per mini-LoRA); None = lora.alpha_gen / lora.r_gen."""
    lr: float | None = None
    """The trainer's learning rate when set (the official 3e-4 in the preset `melora`); None = training.lr."""

    def problems(self) -> list[str]:
        out = []
        if self.lr is not None and self.lr <= 0:
            out.append(f"options.lr must be > 0 (or null: training.lr), got {self.lr}")
        if self.n < 1:
            out.append(f"options.n must be >= 1, got {self.n}")
        if self.r is not None and self.r < 1:
            out.append(f"options.r must be >= 1, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"options.alpha must be > 0, got {self.alpha}")
        return out


@dataclass(frozen=True)
class MELoRAShape:
    """What a MELoRA student is, resolved from the config: mini-LoRAs, their rank and scaling."""

    n: int
    r: int
    scaling: float
    dropout: float
    targets: tuple[str, ...]


def melora_shape(config, n_pairs: int) -> MELoRAShape:
    options, lora = method_options(MELoRAOptions, config), config.lora
    r = options.r if options.r is not None else budget_rank(lora, n_pairs)
    scaling = options.alpha / r if options.alpha is not None else lora.alpha_gen / lora.r_gen
    return MELoRAShape(options.n, r, scaling, lora.dropout, tuple(lora.targets))


class MELoRALinear(ProjectionAdapter):
    """A frozen nn.Linear plus n mini-LoRAs on disjoint input / output slices (block-diagonal update)."""

    def __init__(self, base: nn.Linear, n: int, r: int, scaling: float, dropout: float = 0.0, dtype=None):
        super().__init__(base)
        d_in, d_out = base.in_features, base.out_features
        if d_in % n or d_out % n:
            raise MlasLoraError(f"MELoRA: {d_out}x{d_in} projection is not divisible into {n} blocks")
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.n, self.r, self.scaling = n, r, scaling
        self.A = nn.Parameter(torch.empty(n, r, d_in // n, **kw))
        self.B = nn.Parameter(torch.zeros(n, d_out // n, r, **kw))
        for block in self.A:  # each mini-LoRA as PEFT inits a LoRA on its slice (fan_in = d_in / n)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.A.dtype)
        lead = h.shape[:-1]
        h = h.reshape(-1, self.n, self.in_features // self.n).transpose(0, 1)  # [n, tokens, d_in / n]
        h = torch.bmm(torch.bmm(h, self.A.transpose(1, 2)), self.B.transpose(1, 2))  # [n, tokens, d_out / n]
        delta = h.transpose(0, 1).reshape(*lead, self.out_features) * self.scaling
        return y + delta.to(y.dtype)

    def lowrank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s blockdiag(B_i) [out, n r], blockdiag(A_i) [n r, in]): their product is s diag(B_i A_i)."""
        a, b = self.A.detach(), self.B.detach()
        return self.scaling * torch.block_diag(*b), torch.block_diag(*a)

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, scaling={self.scaling}"


def attach_melora(model: nn.Module, shape: MELoRAShape, dtype: torch.dtype | None = torch.float32) -> dict:
    """Wrap every target projection of `model` in MELoRALinear (float32 factors by default)."""
    bad = sorted(
        {
            f"{proj} ({p.out_features}x{p.in_features})"
            for layer in decoder_layers(model)
            for proj in shape.targets
            if (p := projection(layer, proj)).in_features % shape.n or p.out_features % shape.n
        }
    )
    if bad:
        raise MlasLoraError(
            f"MELoRA: options.n = {shape.n} must divide d_in and d_out of every target projection; "
            f"it does not for {', '.join(bad)} (choose another n or drop those lora.targets)"
        )
    return wrap_projections(
        model,
        shape.targets,
        lambda base: MELoRALinear(base, shape.n, shape.r, shape.scaling, shape.dropout, dtype),
    )


class MELoRA(Standalone, Unrouted):
    name = "melora"
    trains = True
    export_format = "peft"

    def problems(self, config) -> list[str]:
        return options_problems(MELoRAOptions, config)

    def train_key(self, config, inputs: dict) -> dict:
        shape = melora_shape(config, len(config.data.trained_directions))
        return student_key(self.name, config, training=self.training_config(config), melora=asdict(shape))

    def training_config(self, config):
        """config.training at options.lr when that is set."""
        lr = method_options(MELoRAOptions, config).lr
        return config.training if lr is None else dataclasses.replace(config.training, lr=lr)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        attach_melora(model, melora_shape(config, len(pairs)))
        return Student(model, tokenizer)

    def update_norms(self, student):
        return wrapped_update_norms(student.model)

    def save(self, student, path: Path) -> None:
        layer = next(iter(adapter_layers(student.model).values()))
        save_adapter(
            student.model, path, {"format": FORMAT, "n": layer.n, "r": layer.r, "scaling": layer.scaling}
        )

    def load(self, student, path: Path) -> None:
        load_adapter(student.model, path, FORMAT)

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        return export_peft(student.model, folder, base_model_id(config.models.student))

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (MELoRA(),)
