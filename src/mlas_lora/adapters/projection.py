"""The one base class of every layer that wraps a frozen projection (LoRA variants, adapters)."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionWrapper(nn.Module):
    """A frozen nn.Linear `base` plus an update of the subclass's own; shows the base's weight, bias and
    shapes, so code that inspects projections (arch.py, PEFT, transformers) sees the same layer."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features
