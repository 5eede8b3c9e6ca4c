"""`aflora`: AFLoRA (Liu et al., ACL 2024, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in
Parameter Efficient Fine-Tuning of Large Models"), a Table 1 baseline. Each target projection gets a
LoRA path whose factors are each followed by a trainable vector (Eq. 1 of the paper):

    y = W0 x + s Lambda_b ⊙ (B (Lambda_d ⊙ (A x))),   A [r, d_in], B [d_out, r], Lambda_d [r], Lambda_b [d_out]

A and B start trainable and are frozen one matrix at a time during training, by a freezing score
(Eq. 2-4): the sensitivity I of every entry, smoothed Ibar = b1 Ibar + (1 - b1) I, its uncertainty
Ubar = b2 Ubar + (1 - b2) |I - Ibar|, and score = mean over the matrix of Ibar ⊙ Ubar. A cubic
schedule (AFLoRA's GLUE code, from AdaLoRA's) sets how many A / B matrices may still train after
optimizer step t of T:

    k(t) = N                                              t <= t_i
           floor(N (1 - (t - t_i) / (T - t_i - t_f))^3)   t_i < t < T - t_f
           0                                              t >= T - t_f

and after each step the lowest-scored trainable matrices freeze until k(t) remain; a frozen matrix
never trains again. Lambda_d and Lambda_b train to the end. Freezing is requires_grad_(False) and
grad = None: the trainer clears gradients to None, so torch's AdamW skips a frozen matrix entirely
(no momentum, no weight decay) and it stays bitwise unchanged. The trainer calls `after_step` after
each optimizer step; the smoothed scores (buffers of each layer) and the frozen set are saved with
every checkpoint, so a resumed run freezes exactly as an uninterrupted one.

Init as AFLoRA's GLUE scripts (init_type 1, d_init_type 94): A and B kaiming-uniform (a = 0),
Lambda_d = 0.1, Lambda_b = 0, so the student starts at the base model bitwise.

Where ours differs from the original:
  - Sizes. The paper uses r = 4 on GLUE. Our default r = r_gen + P r_spe (P pairs) gives
    r (d_in + d_out) + r + d_out trainable parameters per projection at the start: MLAS-LoRA's
    (r_gen + P r_spe)(d_in + d_out) plus the two vectors (`budget_rank`). `trainable_parameters`
    reports this starting count (every parameter that trains at some point).
  - Scaling. s = alpha / sqrt(r) with `options.alpha` (the code's rule; alpha 1 there); by default
    s = lora.alpha_gen / lora.r_gen, the scaling of every LoRA in Table 1.
  - Schedule. t_i and t_f are fractions of the run (`initial`, `final`: defaults 0.05 and 0.7 are the
    code's CoLA setting, 1 and 14 of 20 epochs). The code freezes every 10 steps, and those matrices
    whose mean score falls below a k-th value taken over all *entries*; we freeze every step, by
    matrix counts, exactly k(t) left trainable.
  - Sensitivity. The code's I is |grad| (|sign(p) grad|), averaged over 10-step windows before
    smoothing; ours smooths every step, with I = |grad| (`sensitivity: gradient`, the default) or
    the Taylor |weight ⊙ grad| (`sensitivity: taylor`).
  - Decoding is always unmerged (float32 factors beside the base weights), whatever evaluation.merge says.

Checkpoints are `adapters/wrapped.py` folders (factors, vectors and score buffers in safetensors) plus
`freezing.json` (the frozen matrices and the step each froze at). The export is a PEFT LoRA of rank r
with the vectors and s folded in, B' = s diag(Lambda_b) B, A' = diag(Lambda_d) A.
"""

from __future__ import annotations

import json
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
from mlas_lora.methods.base import (
    Standalone,
    Student,
    Unrouted,
    method_options,
    options_problems,
    student_key,
)

FORMAT = "mlas-lora-aflora/1"
FREEZING = "freezing.json"
MATRICES = ("A", "B")
LAMBDA_D_INIT = 0.1
SENSITIVITIES = ("gradient", "taylor")


@dataclass
class AFLoRAOptions:
    """AFLoRA's settings, from a system's `options:` section."""

    r: int | None = None
    """Rank of A and B; None = r_gen + P r_spe, MLAS-LoRA's trainable count (the paper: 4)."""
    alpha: float | None = None
    """s = alpha / sqrt(r) when set (AFLoRA's code); None = lora.alpha_gen / lora.r_gen."""
    initial: float = 0.05
    """t_i as a fraction of the optimizer steps: every A and B trains until then."""
    final: float = 0.7
    """t_f as a fraction of the optimizer steps: every A and B is frozen for the last t_f steps."""
    beta1: float = 0.85
    beta2: float = 0.95
    sensitivity: str = "gradient"
    """I of an entry: 'gradient' |grad| (AFLoRA's code) or 'taylor' |weight * grad|."""

    def problems(self) -> list[str]:
        out = []
        if self.r is not None and self.r < 1:
            out.append(f"options.r must be >= 1, got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            out.append(f"options.alpha must be > 0, got {self.alpha}")
        if not (0 <= self.initial and 0 <= self.final and self.initial + self.final <= 1):
            out.append(
                f"options.initial and final must be >= 0 with a sum <= 1, got {self.initial}, {self.final}"
            )
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append(f"options.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.sensitivity not in SENSITIVITIES:
            out.append(f"options.sensitivity: {self.sensitivity!r} (known: {', '.join(SENSITIVITIES)})")
        return out


@dataclass(frozen=True)
class FreezeSchedule:
    """When and by which score A / B matrices freeze (resolved options)."""

    initial: float = 0.05
    final: float = 0.7
    beta1: float = 0.85
    beta2: float = 0.95
    sensitivity: str = "gradient"

    def warmups(self, total: int) -> tuple[int, int]:
        """(t_i, t_f) in optimizer steps for a run of `total` steps."""
        return round(self.initial * total), round(self.final * total)


def trainable_budget(n: int, step: int, total: int, t_i: int, t_f: int) -> int:
    """k(t): how many of the n A / B matrices may still train after optimizer step `step` (cubic)."""
    if step <= t_i:
        return n
    if step >= total - t_f:
        return 0
    return int(n * (1 - (step - t_i) / (total - t_i - t_f)) ** 3)


class AFLoRALinear(ProjectionAdapter):
    """A frozen nn.Linear plus s Lambda_b ⊙ B (Lambda_d ⊙ A x), with the freezing scores of A and B."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0, dtype=None):
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.r, self.scaling = r, scaling
        self.A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.B = nn.Parameter(torch.empty(base.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.A)
        nn.init.kaiming_uniform_(self.B)
        self.lambda_d = nn.Parameter(torch.full((r,), LAMBDA_D_INIT, **kw))
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, **kw))
        for name in MATRICES:
            self.register_buffer(f"ipt_{name}", torch.zeros_like(getattr(self, name)))
            self.register_buffer(f"unc_{name}", torch.zeros_like(getattr(self, name)))
        self.frozen_at: dict[str, int] = {}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.A.dtype)
        h = nn.functional.linear(h, self.A) * self.lambda_d
        delta = nn.functional.linear(h, self.B) * (self.lambda_b * self.scaling)
        return y + delta.to(y.dtype)

    def lowrank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s diag(Lambda_b) B, diag(Lambda_d) A): the update as one rank-r LoRA."""
        b = self.scaling * self.lambda_b.detach()[:, None] * self.B.detach()
        return b, self.lambda_d.detach()[:, None] * self.A.detach()

    @torch.no_grad()
    def update_scores(self, schedule: FreezeSchedule) -> None:
        """Smooth the sensitivity and its uncertainty (Eq. 2-3) of each trainable matrix from its grad."""
        for name in MATRICES:
            param = getattr(self, name)
            if not param.requires_grad or param.grad is None:
                continue
            ipt = (param.grad * param).abs() if schedule.sensitivity == "taylor" else param.grad.abs()
            ibar, ubar = getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}")
            ibar.mul_(schedule.beta1).add_(ipt, alpha=1 - schedule.beta1)
            ubar.mul_(schedule.beta2).add_((ipt - ibar).abs(), alpha=1 - schedule.beta2)

    def score_tensor(self, name: str) -> torch.Tensor:
        """Eq. 4: the freezing score of matrix `name`, mean(Ibar ⊙ Ubar), as a 0-d tensor."""
        return (getattr(self, f"ipt_{name}") * getattr(self, f"unc_{name}")).mean()

    def score(self, name: str) -> float:
        return float(self.score_tensor(name))

    def freeze(self, name: str, step: int) -> None:
        param = getattr(self, name)
        param.requires_grad_(False)
        param.grad = None
        self.frozen_at[name] = step

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, frozen={sorted(self.frozen_at)}"


def aflora_layers(model: nn.Module) -> dict[str, AFLoRALinear]:
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, AFLoRALinear)}


def trainable_matrices(model: nn.Module) -> list[tuple[str, str]]:
    """(layer path, "A" or "B") of every A / B matrix that still trains, in model order."""
    return [
        (path, name)
        for path, layer in aflora_layers(model).items()
        for name in MATRICES
        if getattr(layer, name).requires_grad
    ]


def freeze_step(model: nn.Module, schedule: FreezeSchedule, step: int, total: int) -> list[tuple[str, str]]:
    """After optimizer step `step` of `total`: update the scores, then freeze the lowest-scored
    trainable matrices until k(step) remain (ties: model order). Returns those frozen now."""
    layers = aflora_layers(model)
    for layer in layers.values():
        layer.update_scores(schedule)
    trainable = trainable_matrices(model)
    budget = trainable_budget(len(layers) * len(MATRICES), step, total, *schedule.warmups(total))
    if len(trainable) <= budget:
        return []
    scores = torch.stack([layers[path].score_tensor(name) for path, name in trainable]).tolist()  # one sync
    ranked = sorted(range(len(trainable)), key=lambda i: (scores[i], i))
    frozen = [trainable[i] for i in ranked[: len(trainable) - budget]]
    for path, name in frozen:
        layers[path].freeze(name, step)
    return frozen


def attach_aflora(
    model: nn.Module, targets, r: int, scaling: float, dropout: float = 0.0, dtype=torch.float32
) -> dict[str, AFLoRALinear]:
    """Wrap every target projection of `model` in AFLoRALinear (float32 factors by default)."""
    return wrap_projections(model, targets, lambda base: AFLoRALinear(base, r, scaling, dropout, dtype))


@dataclass
class AFLoRAStudent(Student):
    """The student with its freezing schedule, which `after_step` reads."""

    schedule: FreezeSchedule = FreezeSchedule()


def aflora_settings(config, n_pairs: int) -> tuple[int, float, FreezeSchedule]:
    """(r, s, schedule) resolved from the config's options and lora section."""
    options, lora = method_options(AFLoRAOptions, config), config.lora
    r = options.r if options.r is not None else budget_rank(lora, n_pairs)
    scaling = options.alpha / math.sqrt(r) if options.alpha is not None else lora.alpha_gen / lora.r_gen
    schedule = FreezeSchedule(
        options.initial, options.final, options.beta1, options.beta2, options.sensitivity
    )
    return r, scaling, schedule


def save_freezing(model: nn.Module, path: Path) -> None:
    frozen = {p: dict(layer.frozen_at) for p, layer in aflora_layers(model).items() if layer.frozen_at}
    (Path(path) / FREEZING).write_text(json.dumps({"frozen_at": frozen}, indent=2) + "\n")


def load_freezing(model: nn.Module, path: Path) -> None:
    """Set each A / B trainable or frozen as saved (a loaded run never unfreezes what had frozen)."""
    frozen = json.loads((Path(path) / FREEZING).read_text())["frozen_at"]
    for p, layer in aflora_layers(model).items():
        layer.frozen_at = {k: int(v) for k, v in frozen.get(p, {}).items()}
        for name in MATRICES:
            param = getattr(layer, name)
            param.requires_grad_(name not in layer.frozen_at)
            param.grad = None


class AFLoRA(Standalone, Unrouted):
    name = "aflora"
    trains = True
    export_format = "peft"

    def problems(self, config) -> list[str]:
        return options_problems(AFLoRAOptions, config)

    def train_key(self, config, inputs: dict) -> dict:
        r, scaling, schedule = aflora_settings(config, len(config.data.trained_directions))
        aflora = {
            "r": r,
            "scaling": scaling,
            "schedule": asdict(schedule),
            "dropout": config.lora.dropout,
            "targets": list(config.lora.targets),
        }
        return student_key(self.name, config, aflora=aflora)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from mlas_lora.models.loading import load_model

        r, scaling, schedule = aflora_settings(config, len(pairs))
        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        torch.manual_seed(config.training.seed)
        attach_aflora(model, config.lora.targets, r, scaling, config.lora.dropout)
        return AFLoRAStudent(model, tokenizer, schedule)

    def after_step(self, student, step: int, total_steps: int) -> None:
        freeze_step(student.model, student.schedule, step, total_steps)

    def update_norms(self, student):
        return wrapped_update_norms(student.model)

    def save(self, student, path: Path) -> None:
        layer = next(iter(aflora_layers(student.model).values()))
        save_adapter(student.model, path, {"format": FORMAT, "r": layer.r, "scaling": layer.scaling})
        save_freezing(student.model, path)

    def load(self, student, path: Path) -> None:
        load_adapter(student.model, path, FORMAT)
        load_freezing(student.model, path)

    def export(self, student, config, folder: Path, merge: bool = False) -> Path:
        from mlas_lora.models.loading import base_model_id
        from mlas_lora.stage_files import fresh_dir

        fresh_dir(folder)
        return export_peft(student.model, folder, base_model_id(config.models.student))

    def trainable_parameters(self, student) -> int:
        """Every adapter parameter that trains at some point (A and B until they freeze)."""
        return sum(
            p.numel()
            for layer in aflora_layers(student.model).values()
            for n, p in layer.named_parameters()
            if not n.startswith("base.")
        )


METHODS = (AFLoRA(),)
