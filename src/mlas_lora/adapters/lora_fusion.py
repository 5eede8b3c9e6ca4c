"""LoRA-Flow's token-level fusion of frozen LoRAs (Wang et al., ACL 2024): the layer-level fusion gate.

Each decoder layer l has one fusion gate. From the hidden state x_t^l entering the layer it gives one
weight per LoRA for every token,

    w^l = softmax(W_gate^l x_t^l) + b^l          W_gate^l [k, d], b^l [k]

(b outside the softmax, so the weights need not sum to one), and every target projection of that
layer adds the weighted sum of the k frozen LoRAs:

    y = W x + sum_i w_i^l (B_i A_i x)            (the LoRAs' scalings folded into B_i)

computed as one low-rank product: x -> [A_1; ..; A_k] x -> ⊙ (w repeated r times) -> [B_1, .., B_k].
A forward pre-hook on each decoder layer computes w^l into a slot its projections read; a forward
hook empties the slot when the layer is done. Only W_gate and b are parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlas_lora.adapters.projection import ModelWrapper, ProjectionWrapper
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTION_PATHS, decoder_layers, projection


class FusionGate(nn.Module):
    """w = softmax(W x) + b, W [k, hidden] zero (every softmax weight 1/k) and b [k] zero here; LoRA-Flow
    sets b to its start (methods/lora_flow.py: the official [-0.5, 0.5] spread over the pairs)."""

    def __init__(self, hidden: int, n_loras: int, device=None, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_loras, hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_loras, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.to(self.weight.dtype), self.weight)
        return torch.softmax(logits.float(), dim=-1) + self.bias


class _Slot:
    """The current fusion weights [batch, tokens, k] of one layer (None outside its forward)."""

    weights: torch.Tensor | None = None


class FusedLoRALinear(ProjectionWrapper):
    """A frozen nn.Linear plus k frozen LoRAs mixed per token by its layer's fusion weights."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rank: int, slot: _Slot):
        super().__init__(base)
        self.rank, self.slot = rank, slot
        self.register_buffer("A", a.detach().clone())  # [k r, in]
        self.register_buffer("B", b.detach().clone())  # [out, k r], scalings folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.slot.weights is None:
            raise MlasLoraError("LoRA-Flow: a fused projection ran outside its decoder layer's forward")
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x = x.to(self.A.dtype)
        h = F.linear(x, self.A)
        h = h * self.slot.weights.repeat_interleave(self.rank, dim=-1).to(h.dtype)
        return y + F.linear(h, self.B).to(y.dtype)


class LoRAFlowModel(ModelWrapper):
    """A causal LM with fused projections and one FusionGate per decoder layer (`gates`)."""

    def __init__(self, model: nn.Module, gates: nn.ModuleList, pairs: tuple[str, ...], rank: int, targets):
        super().__init__(model)
        self.gates = gates
        self.pairs, self.rank, self.targets = tuple(pairs), rank, tuple(targets)

    def fused_layers(self) -> dict[tuple[int, str], FusedLoRALinear]:
        layers = decoder_layers(self.model)
        return {(i, p): projection(layers[i], p) for i in range(len(layers)) for p in self.targets}

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"gate.{k}": v for k, v in self.gates.state_dict().items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """`lora.{layer}.{proj}.{A,B}` -> the frozen concatenated factors (pairs in `self.pairs` order)."""
        return {
            f"lora.{i}.{p}.{key}": getattr(layer, key)
            for (i, p), layer in self.fused_layers().items()
            for key in ("A", "B")
        }


def attach_lora_fusion(
    model: nn.Module,
    pairs: Sequence[str],
    rank: int,
    loras: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
) -> LoRAFlowModel:
    """Fuse frozen LoRAs into `model`'s projections: loras[(layer, proj)] = (A [k r, in], B [out, k r]).

    Every decoder layer must have the same target projections; the base is frozen and the gates
    (zero: uniform weights) are the only trainable parameters.
    """
    blocks = decoder_layers(model)
    targets = sorted({p for _, p in loras}, key=list(PROJECTION_PATHS).index)
    missing = [(i, p) for i in range(len(blocks)) for p in targets if (i, p) not in loras]
    if missing:
        raise MlasLoraError(f"LoRA-Flow: every layer needs the same LoRAs; missing {missing[:5]}")
    for param in model.parameters():
        param.requires_grad_(False)
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    gates = nn.ModuleList(FusionGate(hidden, len(pairs), device) for _ in blocks)
    for i, block in enumerate(blocks):
        slot = _Slot()
        for proj in targets:
            a, b = loras[(i, proj)]
            if a.shape[0] != len(pairs) * rank or b.shape[1] != len(pairs) * rank:
                raise MlasLoraError(
                    f"LoRA-Flow: layer {i} {proj}: factors are not {len(pairs)} LoRAs of rank {rank}"
                )
            parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
            setattr(
                block.get_submodule(parent), attr, FusedLoRALinear(projection(block, proj), a, b, rank, slot)
            )
        block.register_forward_pre_hook(_gate_hook(gates[i], slot), with_kwargs=True)
        block.register_forward_hook(_clear_hook(slot))
    return LoRAFlowModel(model, gates, tuple(pairs), rank, targets)


def _gate_hook(gate: FusionGate, slot: _Slot):
    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        slot.weights = gate(hidden)

    return hook


def _clear_hook(slot: _Slot):
    def hook(_module, _args, _output):
        slot.weights = None

    return hook
