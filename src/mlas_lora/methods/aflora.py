"""`aflora`: AFLoRA (Liu et al., ACL 2024, "AFLoRA: Adaptive Freezing of Low Rank Adaptation in
Parameter Efficient Fine-Tuning of Large Models"), a Table 1 baseline. Each target projection gets a
LoRA path whose factors are each followed by a trainable vector (Eq. 1 of the paper):

    y = W0 x + s Lambda_b ⊙ (B (Lambda_d ⊙ (A x)))
    A [r, d_in], B [d_out, r], Lambda_d [r], Lambda_b [d_out]

A and B start trainable and freeze one matrix at a time; Lambda_d and Lambda_b train to the end.

Official code followed: zeyuliu1037/AFLoRA @ 23f632f, its LLM (LLaMA-7B, math) setup in gsm8k/:
  - gsm8k/trainer.py:30-47 (`ipt_all_tasks_config["commonsense"]`: initial_warmup 0.3, final_warmup
    0.3, deltaT 10, beta1 0.85, beta2 0.95) and :175-181 (the freezing runs after every backward);
  - gsm8k/utils.py:203-227 (`schedule_threshold_comb`), :229-263 (`update_ipt_with_local_window`),
    :276-322 (`mask_with_threshold`);
  - gsm8k/peft/src/peft/tuners/lora.py:317 (s = alpha / r), :328-332 and :359-363 (A, B
    kaiming-uniform, a = 0; Lambda_d = 0.1, Lambda_b = 0: the student starts at the base bitwise),
    :411-415 (the forward above);
  - gsm8k/llama_7b_math_aflora.sh:11 (lr 2e-3), :15-16 (q k v up down, r 32, alpha 64).

The freezing, after optimizer step t of T (`freeze_step`):
  1. Sensitivity (Eq. 2): I = |sign(p) ⊙ grad| of every entry of every trainable A / B (`sensitivity:
     taylor` gives |p ⊙ grad| instead), averaged over windows of `every` = 10 steps. At each window's
     end (t a multiple of `every`) the window mean enters Ibar = b1 Ibar + (1 - b1) I and
     Ubar = b2 Ubar + (1 - b2) |I - Ibar| (Eq. 3). The score of an entry is Ibar ⊙ Ubar (Eq. 4).
  2. Remaining ratio rho(t), with t_i = `initial` T and t_f = `final` T (not rounded) and
     x = (t - t_i) / (T - t_i - t_f):

         rho(t) = 1                       t <= t_i                (no freezing)
                  1 - x^2                 t_i < t <= T - t_f      (`shape: quadratic`, the LLM code)
                  (1 - x)^3                                       (`shape: cubic`, glue/utils.py:236-258)
                  0                       t > T - t_f             (checked every step)

     checked only when t is a multiple of `every` inside the span.
  3. At a check: one global threshold, the k-th smallest entry score over every still-trainable A / B
     entry, k = int(n (1 - rho)); every trainable matrix whose mean score is below it freezes (none
     when k = 0). A frozen matrix never trains again.
  Our step t is the code's `global_step`: both freeze a matrix after it has had t updates, from
  scores of the gradients of updates 1..t. At 48 steps (the cpu budget) the checks fall at 20 and 30
  and every matrix is frozen after step 34; at 480 steps at 150, 160, .., 330 and all after 337.
  The GLUE (CoLA) setting of the first version is `options: {initial: 0.05, final: 0.7, shape: cubic}`.

Freezing is requires_grad_(False) and grad = None: the trainer clears gradients to None, so torch's
AdamW skips a frozen matrix entirely (no momentum, no weight decay) and it stays bitwise unchanged.
The trainer calls `after_step` after each optimizer step; the score and window buffers of each layer
and the frozen set are saved with every checkpoint, so a resumed run freezes as an uninterrupted one.

Learning rate: the trainer runs at `options.lr`, by default (null) the official 2e-3; training.lr does
not apply to this method (an lr grid sets options.lr). `train_key` holds the lr used.

Where ours differs from the official code:
  - Sizes. The code runs r = 32 on q k v up down of LLaMA-7B. Our default r = r_gen + P r_spe (P
    pairs) on lora.targets gives r (d_in + d_out) + r + d_out trainable parameters per projection at
    the start: MLAS-LoRA's (r_gen + P r_spe)(d_in + d_out) plus the two vectors (`budget_rank`).
    `trainable_parameters` reports this starting count (every parameter that trains at some point).
  - Scaling. s = options.alpha / r when set (the LLM code's rule); by default s = lora.alpha_gen /
    lora.r_gen, the scaling of every LoRA in Table 1 (2 at alpha 16, r 8: the code's 64 / 32).
  - At rho = 0 every trainable matrix freezes. The code's kthvalue at k = n keeps a matrix whose
    every entry equals the largest score (only possible with degenerate, e.g. all-zero, scores).
  - The code skips the sensitivity of a step whose gradient has inf / NaN (with a warning); ours
    takes every step's gradient (our trainer's float32 factors do not overflow).
  - Decoding is always unmerged (float32 factors beside the base weights), whatever evaluation.merge says.

Checkpoints are `adapters/wrapped.py` folders (factors, vectors and score buffers in safetensors) plus
`freezing.json` (the frozen matrices and the step each froze at). The export is a PEFT LoRA of rank r
with the vectors and s folded in, B' = s diag(Lambda_b) B, A' = diag(Lambda_d) A.
"""

from __future__ import annotations

import dataclasses
import json
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

FORMAT = "mlas-lora-aflora/2"
FREEZING = "freezing.json"
MATRICES = ("A", "B")
LAMBDA_D_INIT = 0.1
SENSITIVITIES = ("gradient", "taylor")
SHAPES = ("quadratic", "cubic")
OFFICIAL_LR = 2e-3
"""gsm8k/llama_7b_math_aflora.sh:11 of the official code."""


@dataclass
class AFLoRAOptions:
    """AFLoRA's settings, from a system's `options:` section (defaults: the official LLM code's)."""

    r: int | None = None
    """Rank of A and B; None = r_gen + P r_spe, MLAS-LoRA's trainable count (the code: 32)."""
    alpha: float | None = None
    """s = alpha / r when set (the LLM code); None = lora.alpha_gen / lora.r_gen."""
    initial: float = 0.3
    """t_i as a fraction of the optimizer steps: every A and B trains until then."""
    final: float = 0.3
    """t_f as a fraction of the optimizer steps: every A and B is frozen for the last t_f steps."""
    shape: str = "quadratic"
    """rho(t) between: 'quadratic' 1 - x^2 (the LLM code) or 'cubic' (1 - x)^3 (the GLUE code)."""
    every: int = 10
    """The code's deltaT: sensitivity window and freezing check, in optimizer steps."""
    beta1: float = 0.85
    beta2: float = 0.95
    sensitivity: str = "gradient"
    """I of an entry: 'gradient' |sign(p) grad| (AFLoRA's code) or 'taylor' |p grad|."""
    lr: float | None = None
    """The trainer's learning rate; None = the official 2e-3 (training.lr does not apply)."""

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
        if self.shape not in SHAPES:
            out.append(f"options.shape: {self.shape!r} (known: {', '.join(SHAPES)})")
        if self.every < 1:
            out.append(f"options.every must be >= 1, got {self.every}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append(f"options.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.sensitivity not in SENSITIVITIES:
            out.append(f"options.sensitivity: {self.sensitivity!r} (known: {', '.join(SENSITIVITIES)})")
        if self.lr is not None and self.lr <= 0:
            out.append(f"options.lr must be > 0 (or null: the official {OFFICIAL_LR}), got {self.lr}")
        return out


@dataclass(frozen=True)
class FreezeSchedule:
    """When and by which score A / B matrices freeze (resolved options)."""

    initial: float = 0.3
    final: float = 0.3
    shape: str = "quadratic"
    every: int = 10
    beta1: float = 0.85
    beta2: float = 0.95
    sensitivity: str = "gradient"

    def remaining(self, step: int, total: int) -> tuple[float, bool]:
        """(rho, check) after optimizer step `step` of `total`: the share of the trainable entries
        kept and whether matrices freeze now (the code's `schedule_threshold_comb`)."""
        start, end = self.initial * total, total - self.final * total
        if step <= start:
            return 1.0, False
        if step > end:
            return 0.0, True
        x = (step - start) / (end - start)
        rho = 1 - x**2 if self.shape == "quadratic" else (1 - x) ** 3
        return rho, step % self.every == 0


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
        for name in MATRICES:  # the window's mean sensitivity, Ibar and Ubar of each matrix
            for buffer in ("win", "ipt", "unc"):
                self.register_buffer(f"{buffer}_{name}", torch.zeros_like(getattr(self, name)))
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
    def update_scores(self, schedule: FreezeSchedule, step: int) -> None:
        """Add this step's sensitivity of each trainable matrix to its window mean; at a window's end
        (`step` a multiple of `every`) smooth the window into Ibar and Ubar (Eq. 2-3)."""
        seen = (step - 1) % schedule.every  # steps already in the window
        for name in MATRICES:
            param = getattr(self, name)
            if not param.requires_grad or param.grad is None:
                continue
            ipt = (param.grad * (param if schedule.sensitivity == "taylor" else param.sign())).abs()
            window = getattr(self, f"win_{name}")
            if seen == 0:
                window.copy_(ipt)
            else:
                window.mul_(seen / (seen + 1)).add_(ipt, alpha=1 / (seen + 1))
            if step % schedule.every == 0:
                ibar, ubar = getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}")
                ibar.mul_(schedule.beta1).add_(window, alpha=1 - schedule.beta1)
                ubar.mul_(schedule.beta2).add_((window - ibar).abs(), alpha=1 - schedule.beta2)

    def entry_scores(self, name: str) -> torch.Tensor:
        """Eq. 4: the score Ibar ⊙ Ubar of every entry of matrix `name`."""
        return getattr(self, f"ipt_{name}") * getattr(self, f"unc_{name}")

    def score(self, name: str) -> float:
        """The matrix's score: the mean of its entries' (what the threshold is compared with)."""
        return float(self.entry_scores(name).mean())

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
    """After optimizer step `step` of `total`: update the scores; at a check, freeze every trainable
    matrix whose mean score is below the k-th smallest entry score of all trainable matrices,
    k = int(n (1 - rho)) (the code's `mask_with_threshold`); at rho = 0 all. Returns those frozen now."""
    layers = aflora_layers(model)
    for layer in layers.values():
        layer.update_scores(schedule, step)
    rho, check = schedule.remaining(step, total)
    trainable = trainable_matrices(model)
    if not check or not trainable:
        return []
    frozen = trainable
    if rho > 0:
        scores = [layers[path].entry_scores(name) for path, name in trainable]
        entries = torch.cat([score.flatten() for score in scores])
        k = int(entries.numel() * (1 - rho))
        if k < 1:
            return []
        threshold = torch.kthvalue(entries, k).values
        below = (torch.stack([score.mean() for score in scores]) < threshold).tolist()  # one sync
        frozen = [matrix for matrix, low in zip(trainable, below, strict=True) if low]
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
    scaling = options.alpha / r if options.alpha is not None else lora.alpha_gen / lora.r_gen
    schedule = FreezeSchedule(
        options.initial,
        options.final,
        options.shape,
        options.every,
        options.beta1,
        options.beta2,
        options.sensitivity,
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
        return student_key(self.name, config, training=self.training_config(config), aflora=aflora)

    def training_config(self, config):
        """config.training at options.lr, or at the official 2e-3 when that is null."""
        lr = method_options(AFLoRAOptions, config).lr
        return dataclasses.replace(config.training, lr=OFFICIAL_LR if lr is None else lr)

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
