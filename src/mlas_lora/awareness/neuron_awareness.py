"""Eq. (2): Taylor awareness of every neuron of every target projection, from activation gradients.

    Phi_{l,j}(s,t) = sum over the pair's sentences and real tokens of | dL/dh_{l,j} * h_{l,j} |

A neuron is one coordinate of an activation space a projection reads or writes: for projection
p in layer l, `in` neurons are the coordinates of its input (one per weight column) and `out`
neurons the coordinates of its output (one per weight row). L is the next-token loss on the target
side only (see `scoring.seed_target_loss`).

How it is computed: a forward hook on each projection registers tensor hooks on the projection's
input and output; when backward reaches those tensors the hook receives the full gradient dL/dh
and adds |grad * h| summed over batch and tokens into a float32 buffer [P, features] for the
current pair. Only activations need gradients, never weights (the caller freezes them), so the
cost is one forward and one activation-only backward.

Shared inputs: q, k and v read the same tensor (the attention-norm output), and gate and up read
the same tensor (the MLP-norm output). The tensor hook fires once with the *total* gradient of that
tensor, so the score is computed once per shared tensor and q/k/v (and gate/up) get equal `in`
scores. Sharing is detected by tensor identity in each forward, so a family that feeds them
separate tensors is scored per tensor instead.

Memory: each watched activation is held until its gradient arrives, then dropped. The largest,
down's input act(gate_out) * up_out (intermediate_size wide), is not held but rebuilt in backward
from gate_out and up_out, which autograd keeps anyway, once a bit-for-bit check on the first
batch has shown that this layer's MLP computes it that way.

Padding: with right padding and target-only labels, padded positions never reach the loss, so
their gradient is zero; the token mask is still applied so a non-finite padded activation cannot
leak into a score.
"""

from __future__ import annotations

import torch
from torch import nn

from mlas_lora.distributed import all_reduce_sum_
from mlas_lora.models.arch import PROJECTIONS, projection

SIDES = ("in", "out")


def phi_key(layer: int, proj: str, side: str) -> str:
    """File key of one score tensor: `phi.{layer}.{proj}.{in|out}`."""
    return f"phi.{layer}.{proj}.{side}"


class NeuronAwarenessTap:
    """Hooks on the seven projections of every decoder layer that accumulate Eq. (2) per pair.

    Call `start_batch(pair_index, token_mask)` before each forward and `end_batch()` after the
    backward; `scores()` returns {phi_key: float32 [P, features]} on the CPU. `device` holds the
    buffers (default: each projection's weight's, which is `meta` for a block offloaded by a device
    map). Under data parallelism `sum_across_processes` adds every process's buffers up.
    """

    def __init__(self, layers: nn.ModuleList, num_pairs: int, device: torch.device | None = None):
        self.buffers: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        self._handles = []
        self._pair, self._padding = 0, None
        self._seen: dict[int, dict[int, str]] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self._rebuild: dict[str, object] = {}
        self._mlp_acts = {
            index: getattr(getattr(layer, "mlp", None), "act_fn", None) for index, layer in enumerate(layers)
        }
        self._recompute: dict[int, bool] = {}
        for index, layer in enumerate(layers):
            for proj in PROJECTIONS:
                module = projection(layer, proj)
                for side, size in (("in", module.in_features), ("out", module.out_features)):
                    self.buffers[phi_key(index, proj, side)] = torch.zeros(
                        num_pairs, size, dtype=torch.float32, device=device or module.weight.device
                    )
                self._handles.append(module.register_forward_hook(self._hook(index, proj)))

    def start_batch(self, pair_index: int, token_mask: torch.Tensor) -> None:
        """token_mask: bool [B, T], True on real tokens."""
        self._pair = pair_index
        self._padding = ~token_mask[..., None]
        self.end_batch()

    def end_batch(self) -> None:
        # Drop the references to this batch's activations so they are freed before the next forward.
        self._seen.clear()
        self._saved.clear()

    def _hook(self, layer: int, proj: str):
        in_key, out_key = phi_key(layer, proj, "in"), phi_key(layer, proj, "out")

        def hook(module, args, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            hidden_in = args[0]
            # Identity by id() is safe here: every watched tensor stays alive in `_saved` until the
            # backward, and `_seen` is cleared before the next forward.
            seen = self._seen.setdefault(layer, {})
            owner = seen.get(id(hidden_in))
            if owner is None:
                seen[id(hidden_in)] = in_key
                keep = not (proj == "down" and self._down_input_rebuildable(layer, hidden_in))
                self._watch(in_key, hidden_in, keep)
            else:
                self.aliases[in_key] = owner
            self._watch(out_key, output)

        return hook

    def _down_input_rebuildable(self, layer: int, hidden_in: torch.Tensor) -> bool:
        """Whether down's input is act(gate_out) * up_out, checked bit for bit on the first batch.

        Holding down's input would be the largest cost of Eq. (2) (intermediate_size per token and
        layer); gate_out and up_out are held anyway (autograd saves them too), so down's input is
        rebuilt from them in backward, which costs one elementwise act and product.
        """
        if layer not in self._recompute:
            act = self._mlp_acts[layer]
            gate, up = (
                self._saved.get(phi_key(layer, "gate", "out")),
                self._saved.get(phi_key(layer, "up", "out")),
            )
            with torch.no_grad():
                same = (
                    act is not None
                    and gate is not None
                    and up is not None
                    and torch.equal(act(gate) * up, hidden_in)
                )
            self._recompute[layer] = same
        if self._recompute[layer]:
            self._rebuild[phi_key(layer, "down", "in")] = self._down_input(layer)
        return self._recompute[layer]

    def _down_input(self, layer: int):
        gate_key, up_key, act = (
            phi_key(layer, "gate", "out"),
            phi_key(layer, "up", "out"),
            self._mlp_acts[layer],
        )
        return lambda: act(self._saved[gate_key]) * self._saved[up_key]

    def _watch(self, key: str, activation: torch.Tensor, keep: bool = True) -> None:
        # The activation is held by the tap, not by the hook's closure: a closure holding the tensor
        # it is registered on is a reference cycle through autograd that Python cannot collect.
        # Popping it in the hook frees each activation as soon as its gradient has been used.
        if keep:
            self._saved[key] = activation
        activation.register_hook(self._accumulator(key))

    def _accumulator(self, key: str):
        buffer, pair, padding = self.buffers[key], self._pair, self._padding

        def accumulate(grad: torch.Tensor) -> None:
            with torch.no_grad():
                activation = self._saved.pop(key) if key in self._saved else self._rebuild[key]()
                taylor = grad * activation
                taylor.abs_()
                taylor.masked_fill_(padding.to(taylor.device), 0)
                buffer[pair].add_(taylor.sum(dim=(0, 1), dtype=torch.float32).to(buffer.device))

        return accumulate

    def sum_across_processes(self) -> None:
        """Add up every process's buffers (the sums of Eq. 2 over its shard); nothing to do alone."""
        all_reduce_sum_(self.buffers.values())

    def scores(self) -> dict[str, torch.Tensor]:
        """{phi_key: float32 [P, features]} on the CPU; aliased `in` scores are copies of their owner."""
        return {key: self.buffers[self.aliases.get(key, key)].to("cpu", copy=True) for key in self.buffers}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.end_batch()
