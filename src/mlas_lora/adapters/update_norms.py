"""How far training has moved a model: ||Delta W||_F / ||W||_F of each adapted projection, per step.

A LoRA update Delta W = s B A (B [out, r], A [r, in]) is never formed: its Frobenius norm comes from
two r x r Gram matrices, ||B A||_F^2 = sum((B^T B) * (A A^T)), so logging it every step costs a few
small matmuls per projection. For the routed student (Eq. 9) the update of pair i is the general plus
pair i's LoRA (minus the frozen initial product in residual mode), `RoutedLoRALinear.pair_update`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def lowrank_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||B A||_F without forming B A (float64 Gram matrices)."""
    b, a = b.detach().double(), a.detach().double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())


def _norm(weight: torch.Tensor) -> float:
    return float(weight.detach().double().norm())


def routed_update_norms(routed) -> Callable[[], dict[str, float]]:
    """A callable giving pair -> mean over routed projections of ||Delta W_pair|| / ||W||."""
    layers = list(routed.routed_layers().values())
    weights = [_norm(layer.base.weight) for layer in layers]

    def norms() -> dict[str, float]:
        return {
            pair: sum(
                lowrank_norm(*layer.pair_update(pair)) / w for layer, w in zip(layers, weights, strict=True)
            )
            / len(layers)
            for pair in routed.lora_config.pairs
        }

    return norms


def peft_update_norms(model: nn.Module) -> Callable[[], dict[str, float]]:
    """A callable giving {"all": mean over LoRA projections of ||s B A|| / ||W||} of a PEFT LoRA model."""
    blocks = [
        (module, name, _norm(module.get_base_layer().weight))
        for module in model.modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
        for name in module.lora_A
    ]

    def norms() -> dict[str, float]:
        ratios = [
            m.scaling[n] * lowrank_norm(m.lora_B[n].weight, m.lora_A[n].weight) / w for m, n, w in blocks
        ]
        return {"all": sum(ratios) / len(ratios)} if ratios else {}

    return norms
