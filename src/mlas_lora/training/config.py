"""The fine-tuning settings (Sec. 4.1), read by the trainer; the experiment config holds one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainingConfig:
    """Sec. 4.1: AdamW, lr 1e-4, batch 64 (= micro-batch x 8 accumulation), 3 epochs."""

    lr: float = 1e-4
    epochs: float = 3.0
    micro_batch: int = 8
    grad_accum: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_steps: int | None = None
    """Optimizer steps (overrides epochs when set)."""
    mixed_pairs: bool = True
    """Micro-batches mix pairs (True) or hold one pair each (False)."""
    max_tokens: int = 256
    checkpoint_every: int = 50
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.lr <= 0:
            out.append(f"training.lr must be > 0, got {self.lr}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            out.append("training.micro_batch and training.grad_accum must be >= 1")
        return out
