"""The fine-tuning settings (Sec. 4.1), read by the trainer; the experiment config holds one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillConfig:
    """Token-level distillation (beyond the paper): loss = (1 - weight) x CE + weight x divergence
    between the teacher's and the student's next-token distributions at the target positions
    (training/distill.py). Off at weight 0: the teacher is not loaded and the loss is CE alone."""

    weight: float = 0.0
    """Share of the divergence in the loss, in [0, 1]; 0 = off."""
    temperature: float = 1.0
    """Both logits are divided by it before the softmax (no T^2 factor: the loss is as written above)."""
    divergence: str = "forward_kl"
    """'forward_kl' KL(teacher || student), 'reverse_kl' KL(student || teacher), or 'jsd': the
    generalised Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024; TRL's
    generalized_jsd_loss) at `beta`."""
    beta: float = 0.5
    """jsd only: the teacher's weight in the mixture (0 gives forward KL, 1 reverse KL)."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.weight <= 1:
            out.append(f"training.distill.weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0:
            out.append(f"training.distill.temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            out.append(f"training.distill.divergence: {self.divergence!r} (known: {', '.join(DIVERGENCES)})")
        if not 0 <= self.beta <= 1:
            out.append(f"training.distill.beta must be in [0, 1], got {self.beta}")
        return out


@dataclass
class TrainingConfig:
    """Sec. 4.1: AdamW, lr 1e-4, batch 64 (= micro-batch x 8 accumulation), 3 epochs."""

    lr: float = 1e-4
    epochs: float = 3.0
    micro_batch: int = 8
    """Examples per forward pass (per process)."""
    grad_accum: int = 8
    """Micro-batches per optimizer step, over all processes: the global batch is micro_batch x
    grad_accum with any number of processes (under `accelerate launch` each process runs every
    N-th micro-batch of a step, so grad_accum must be >= N)."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = None
    """Optimizer steps (overrides epochs when set)."""
    mixed_pairs: bool = True
    """Micro-batches mix pairs (True) or hold one pair each (False)."""
    max_tokens: int = 256
    group_by_length: bool = False
    """Sort each optimizer step's examples (micro_batch x grad_accum, the same examples as without it) by
    length before cutting them into the step's micro-batches, and weigh every target token of the step
    alike (the step's loss sum / its target tokens), so the gradient does not depend on the grouping.
    Less padding per forward; with a smaller micro_batch and a larger grad_accum of the same product, less
    still (benchmarks/bench_train_step.py). Off: micro-batches in shuffled order, each one's mean loss."""
    checkpoint_every: int = 50
    keep_checkpoints: int | None = 2
    """Checkpoints kept on disk (the newest); null keeps every one (`mlas-lora curve` reads them all)."""
    keep_states: int = 2
    """Checkpoints that keep their training state (AdamW moments, scheduler, RNG: what a resume
    reads), the newest; older kept checkpoints hold their adapters only, which is all `mlas-lora
    curve` reads. The state is 2x the trained weights in float32: 3.7 GB a checkpoint for full-ft
    on Qwen2.5-0.5B."""
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Token-level distillation from the teacher (off by default: weight 0)."""

    def key_settings(self) -> dict:
        """What a training's result depends on: every field but what stays on disk."""
        out = {k: v for k, v in asdict(self).items() if k not in ("keep_checkpoints", "keep_states")}
        if not self.group_by_length:  # a field added later enters the key only when set
            del out["group_by_length"]
        if not self.distill.enabled:  # off changes nothing: the loss is CE bit for bit
            del out["distill"]
        return out

    def problems(self) -> list[str]:
        out = []
        if self.lr <= 0:
            out.append(f"training.lr must be > 0, got {self.lr}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            out.append("training.micro_batch and training.grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"training.max_steps must be >= 1 (or null: use epochs), got {self.max_steps}")
        if self.epochs <= 0:
            out.append(f"training.epochs must be > 0, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            out.append(f"training.keep_checkpoints must be >= 1 (or null: all), got {self.keep_checkpoints}")
        if self.keep_states < 1:
            out.append(
                f"training.keep_states must be >= 1 (a resume needs the newest), got {self.keep_states}"
            )
        if self.checkpoint_every < 1:
            out.append(f"training.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.max_tokens < 2:
            out.append(f"training.max_tokens must be >= 2, got {self.max_tokens}")
        if self.weight_decay < 0:
            out.append(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        return out
