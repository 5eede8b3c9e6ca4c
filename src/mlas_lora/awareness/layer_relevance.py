"""Eq. (1): layer relevance R_i(s,t) and the choice of which teacher layers the student receives.

    R_i(s,t) = mean over the pair's seed sentences of || A_{i+1} - A_i ||_1

A_i is the hidden state entering decoder layer i (A_0 is the embedding output, after any embedding
scaling the family applies) and A_{i+1} the state leaving it, so every decoder layer gets one score:
how much it rewrites the residual stream for that language pair. Per sentence the reduction is:

    sum over hidden units -> mean over the sentence's tokens of one *reading* -> mean over sentences.

Readings (which tokens a sentence's R averages over; all come from the same pass):

    source   the source segment's tokens inside the translation prompt (the default: the paper
             scores "the forward pass of a source sentence x_s"; with causal attention these
             positions do not see the target, so this equals a forward pass of the prompt alone)
    prompt   every prompt token (instruction, chat template and source; no target)
    all      prompt and reference target (the reading used before the paper's was made the default)

The student has fewer layers (L) than the teacher; the L teacher layers with the highest relevance
are kept in their original order and mapped in order onto student layers 0..L-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mlas_lora.distributed import all_reduce_sum_
from mlas_lora.errors import MlasLoraError

SELECTION_MODES = ("mean", "pair")
READINGS = ("source", "prompt", "all")
"""Which tokens of a seed sentence Eq. (1) averages over (module docstring); `source` is the paper's."""


class LayerRelevanceTap:
    """Forward hooks on the decoder layers that accumulate Eq. (1) sums per pair, for every reading.

    Call `start_batch(pair_index, masks)` before each forward, with `masks` {reading: bool [B, T]}
    (or one bool [B, T] tensor, the `all` reading); `relevance(reading)` gives R [P, N]. The sums
    are in float32 whatever the model dtype; the difference is taken in float32 too, since a
    bfloat16 subtraction of two nearby residual states would lose most of the signal.

    `device` holds the sums (default: the first layer's); layers placed elsewhere by a device map
    add into it. Under data parallelism each process taps its shard of the seeds, then
    `sum_across_processes` adds the sums and sentence counts up before any mean is taken.
    """

    def __init__(self, layers: nn.ModuleList, num_pairs: int, device: torch.device | None = None):
        self.device = device or next(layers[0].parameters()).device
        self.shape = (num_pairs, len(layers))
        self.sums: dict[str, torch.Tensor] = {}
        self.sentences = torch.zeros(num_pairs, dtype=torch.float64)
        self._pair, self._masks = 0, {}
        self._handles = [
            layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def start_batch(self, pair_index: int, masks: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """masks: {reading: bool [B, T]} marking the tokens each reading averages over."""
        masks = masks if isinstance(masks, dict) else {"all": masks}
        self._pair = pair_index
        self._masks = {name: m.to(torch.float32) for name, m in masks.items()}
        for name in masks:
            self.sums.setdefault(name, torch.zeros(self.shape, dtype=torch.float32, device=self.device))
        self.sentences[pair_index] += next(iter(masks.values())).shape[0]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                hidden_in = hidden_in.detach().to(hidden_out.device)  # the previous layer's device
                per_token = (hidden_out.detach().float() - hidden_in.float()).abs_().sum(-1)
                for name, mask in self._masks.items():
                    mask = mask.to(per_token.device)
                    per_sentence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
                    self.sums[name][self._pair, index] += per_sentence.sum().to(self.device)

        return hook

    def sum_across_processes(self, readings: Sequence[str] = READINGS) -> None:
        """Add up the sums of `readings` and the sentence counts of every process (a process
        whose shard was empty contributes zeros); nothing to do in a single process."""
        for name in readings:
            self.sums.setdefault(name, torch.zeros(self.shape, dtype=torch.float32, device=self.device))
        all_reduce_sum_([*(self.sums[name] for name in readings), self.sentences])

    def relevance(self, reading: str = "all") -> torch.Tensor:
        """R [P, N] (float32, CPU) of one reading: the mean over sentences; pairs with none stay 0."""
        if reading not in self.sums:
            raise MlasLoraError(
                f"no relevance was accumulated for reading {reading!r} (have {list(self.sums)})"
            )
        counts = self.sentences.clamp(min=1).to(torch.float32)[:, None]
        return self.sums[reading].cpu() / counts

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def select_layers(
    relevance: torch.Tensor,
    num_layers: int,
    mode: str = "mean",
    pair: int | str | None = None,
    pairs: Sequence[str] | None = None,
) -> list[int]:
    """The top-`num_layers` teacher layers by relevance, in their original (ascending) order.

    mode="mean" ranks layers by R averaged over pairs, the paper's single shared student;
    mode="pair" ranks by one pair's R (`pair` is its index, or its name with `pairs` given).
    Ties go to the lower layer index, so the choice is deterministic.
    """
    relevance = torch.as_tensor(relevance, dtype=torch.float32)
    if relevance.ndim != 2:
        raise MlasLoraError(f"relevance must be [pairs, layers], got shape {tuple(relevance.shape)}")
    total = relevance.shape[1]
    if not 1 <= num_layers <= total:
        raise MlasLoraError(f"cannot select {num_layers} layers from a teacher with {total} layers")
    ranking = _ranking_scores(relevance, mode, pair, pairs)
    # A stable sort on -score keeps the lower index first among equal scores.
    order = torch.sort(-ranking, stable=True).indices[:num_layers]
    return sorted(order.tolist())


def _ranking_scores(relevance, mode, pair, pairs) -> torch.Tensor:
    if mode == "mean":
        return relevance.mean(0)
    if mode != "pair":
        raise MlasLoraError(f"unknown selection mode {mode!r}; expected one of {', '.join(SELECTION_MODES)}")
    if isinstance(pair, str):
        if pairs is None or pair not in pairs:
            raise MlasLoraError(f"pair {pair!r} not among the scored pairs {list(pairs or [])}")
        pair = list(pairs).index(pair)
    if pair is None or not 0 <= pair < relevance.shape[0]:
        raise MlasLoraError(f"mode='pair' needs a pair index in [0, {relevance.shape[0]}), got {pair!r}")
    return relevance[pair]
