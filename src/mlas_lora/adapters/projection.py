"""Base classes of the wrappers: a layer around a frozen projection (LoRA variants, adapters), and a
model around a causal LM whose projections were replaced (routed, per-language and fused LoRAs)."""

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


class ModelWrapper(nn.Module):
    """A causal LM `model` behind a module of its own, used as the model itself: forward, generate,
    config and output embeddings are the wrapped model's (its parameters keep their `model.` names)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        """The wrapped model's Hugging Face config, so generic code can treat this as the model."""
        return self.model.config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()
