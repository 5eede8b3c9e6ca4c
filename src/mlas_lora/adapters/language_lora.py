"""Language-specific LoRA (LSLo, Cao et al., EMNLP 2024), routed per sample, with pruning masks.

One LoRA per *language*, not per pair. The original is an encoder-decoder whose encoder LSLo is
indexed by the source language and whose decoder LSLo by the target language; in a decoder-only LM
the layers below `split` take the encoder's role (routed by the source), the others the decoder's
(routed by the target):

    layer l < split:   y = W x + s (B_src ⊙ M_B)(A_src ⊙ M_A) x
    layer l >= split:  y = W x + s (B_tgt ⊙ M_B)(A_tgt ⊙ M_A) x

A batch may mix pairs: each side keeps a `Router` over its languages (the one of routed_lora.py), the
factors of the languages present are concatenated into one low-rank product and a per-sample one-hot
mask picks each row's language. Languages absent from a batch never enter the graph (grad None).

M_A, M_B are the pruning masks (boolean buffers, all True at first) of the gradual magnitude pruning
of Zhu & Gupta (2017), which LSLo uses to find each language's "intrinsic subspace": at fraction f of
training the sparsity is

    s(f) = s_final (1 - (1 - (f - f_start) / (f_end - f_start))^3)   for f_start < f < f_end,

0 before f_start and s_final after f_end (`cubic_sparsity`). Every A and B matrix is pruned on its
own to that sparsity (B starts at zero and stays far smaller than A: one pool over both would prune B
first). The masks only grow, are applied in the forward (pruned weights get no gradient) and to the
weights after every optimizer step (AdamW's momentum would move them again), and are saved with the
factors, so a resumed run prunes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mlas_lora.adapters.projection import ModelWrapper, ProjectionWrapper
from mlas_lora.adapters.routed_lora import Router
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTION_PATHS, PROJECTIONS, decoder_layers, projection


def split_pair(pair: str) -> tuple[str, str]:
    """("en", "de") of "en-de"."""
    parts = pair.split("-")
    if len(parts) != 2 or not all(parts):
        raise MlasLoraError(f"bad pair {pair!r}: expected SRC-TGT such as 'en-de'")
    return parts[0], parts[1]


def cubic_sparsity(fraction: float, final: float, start: float, end: float) -> float:
    """Zhu & Gupta's gradual pruning schedule at `fraction` of training (module docstring)."""
    if fraction <= start:
        return 0.0
    if fraction >= end:
        return final
    return final * (1.0 - (1.0 - (fraction - start) / (end - start)) ** 3)


@dataclass(frozen=True)
class LanguageLoRAConfig:
    """Which languages each side has, the split layer, rank, scaling and target projections."""

    pairs: tuple[str, ...]
    split: int
    rank: int
    scaling: float
    targets: tuple[str, ...] = PROJECTIONS
    dropout: float = 0.0
    sparsity: float = 0.0
    """Final fraction of each A and B matrix pruned (`cubic_sparsity`); 0 prunes nothing."""
    prune_start: float = 0.0
    """Fraction of training where pruning starts."""
    prune_end: float = 1.0
    """Fraction of training where the final sparsity is reached."""

    def sparsity_at(self, step: int, total_steps: int) -> float:
        """The schedule's sparsity after optimizer step `step` of `total_steps`."""
        fraction = step / total_steps if total_steps > 0 else 1.0
        return cubic_sparsity(fraction, self.sparsity, self.prune_start, self.prune_end)

    @property
    def sources(self) -> tuple[str, ...]:
        """Languages with a LoRA below the split: the pairs' sources (sorted)."""
        return tuple(sorted({split_pair(p)[0] for p in self.pairs}))

    @property
    def target_languages(self) -> tuple[str, ...]:
        """Languages with a LoRA from the split up: the pairs' targets (sorted)."""
        return tuple(sorted({split_pair(p)[1] for p in self.pairs}))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LanguageLoRAConfig:
        return cls(**{**d, "pairs": tuple(d["pairs"]), "targets": tuple(d["targets"])})


class MaskedFactors(nn.Module):
    """One LoRA (A [r, in] kaiming-uniform, B [out, r] zero, as PEFT) with its pruning masks."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.register_buffer("mask_A", torch.ones_like(self.A, dtype=torch.bool))
        self.register_buffer("mask_B", torch.ones_like(self.B, dtype=torch.bool))

    def masked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ⊙ M_A, B ⊙ M_B): what the forward uses."""
        return self.A * self.mask_A, self.B * self.mask_B

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Grow each mask to floor(sparsity * numel) pruned entries (smallest |w|; pruned ones first)."""
        for weight, mask in ((self.A, self.mask_A), (self.B, self.mask_B)):
            count = math.floor(sparsity * mask.numel() + 1e-9)
            if count > int((~mask).sum()):
                score = weight.detach().abs().float().flatten().masked_fill(~mask.flatten(), -1.0)
                order = torch.argsort(score, stable=True)
                mask.view(-1)[order[:count]] = False

    @torch.no_grad()
    def apply_masks(self) -> None:
        self.A.mul_(self.mask_A)
        self.B.mul_(self.mask_B)


class LanguageLoRALinear(ProjectionWrapper):
    """A frozen nn.Linear plus one LoRA per language of its side, routed per sample by `router`."""

    def __init__(self, base: nn.Linear, router: Router, rank: int, scaling: float, dropout: float, dtype):
        super().__init__(base)
        self.router = router
        self.rank, self.scaling = rank, scaling
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        shape = (base.in_features, base.out_features)
        self.loras = nn.ModuleDict({lang: MaskedFactors(*shape, rank, **kw) for lang in router.pairs})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.router.present:
            raise MlasLoraError("LSLo: no routing set; wrap the call in `with model.routing(pairs):`")
        factors = next(iter(self.loras.values())).A
        autocast = torch.is_autocast_enabled(x.device.type)
        h_dtype = torch.get_autocast_dtype(x.device.type) if autocast else factors.dtype
        x = self.dropout(x)
        if not autocast:
            x = x.to(factors.dtype)
        a, b = self._product_factors(h_dtype, x.device)
        batch = x.shape[0]
        mask = self.router.mask(batch, 0, self.rank, 0.0, self.scaling, x.device, h_dtype)
        mask = mask.view(batch, *([1] * (x.dim() - 2)), mask.shape[-1])
        return y + F.linear(F.linear(x, a) * mask, b).to(y.dtype)

    def _product_factors(self, h_dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat) of the languages present, masked; without grad (decoding) cached per routing.

        Generation calls every layer once per token with the same routing and frozen factors; the
        cache is keyed by the factors' and masks' version counters, so a step, a prune or a load
        invalidates it.
        """
        blocks = [self.loras[self.router.pairs[i]] for i in self.router.present]

        def build():
            factors = [block.masked() for block in blocks]
            return torch.cat([a for a, _ in factors]), torch.cat([b for _, b in factors], dim=1)

        if torch.is_grad_enabled():
            return build()
        tensors = [t for block in blocks for t in (block.A, block.B, block.mask_A, block.mask_B)]
        key = (self.router.present, h_dtype, device, *(t._version for t in tensors))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, tuple(t.to(h_dtype) for t in build()))
        return self._cache[1]

    def language_update(self, language: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s B ⊙ M_B, A ⊙ M_A), detached: the language's whole update of this layer is their product."""
        a, b = self.loras[language].masked()
        return self.scaling * b.detach(), a.detach()

    def extra_repr(self) -> str:
        return f"languages={list(self.loras)}, rank={self.rank}, scaling={self.scaling}"


class LanguageLoRAModel(ModelWrapper):
    """A causal LM with LSLo projections; `routing(pairs)` sets each sample's source and target."""

    def __init__(self, model: nn.Module, config: LanguageLoRAConfig, source: Router, target: Router):
        super().__init__(model)
        self.lslo_config = config
        self.source_router, self.target_router = source, target

    def lslo_layers(self) -> dict[tuple[int, str], LanguageLoRALinear]:
        """(layer index, projection) -> LSLo layer, in model order."""
        layers = decoder_layers(self.model)
        return {
            (i, p): projection(layers[i], p) for i in range(len(layers)) for p in self.lslo_config.targets
        }

    def side(self, layer: int) -> str:
        return "source" if layer < self.lslo_config.split else "target"

    def language(self, pair: str, layer: int) -> str:
        """The language whose LoRA serves `pair` at `layer`."""
        return split_pair(pair)[0 if layer < self.lslo_config.split else 1]

    def _languages(self, pair_ids) -> tuple[list[str], list[str]]:
        if isinstance(pair_ids, torch.Tensor):
            pair_ids = pair_ids.reshape(-1).tolist()
        pairs = [self.lslo_config.pairs[p] if isinstance(p, int) else p for p in pair_ids]
        sides = [split_pair(p) for p in pairs]
        return [s for s, _ in sides], [t for _, t in sides]

    @contextmanager
    def routing(self, pair_ids) -> Iterator[LanguageLoRAModel]:
        """`with model.routing(pairs):` (names like "en-de", or indices into the config's pairs).

        Any SRC-TGT whose source has a lower LoRA and target an upper one works, also one not trained
        as a pair (LSLo's zero-shot directions).
        """
        sources, targets = self._languages(pair_ids)
        saved = self.source_router.state(), self.target_router.state()
        try:
            self.source_router.set(sources)
            self.target_router.set(targets)
            yield self
        finally:
            self.source_router.restore(saved[0])
            self.target_router.restore(saved[1])

    def factors(self) -> Iterator[MaskedFactors]:
        for layer in self.lslo_layers().values():
            yield from layer.loras.values()

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Grow every mask to `sparsity` (never shrink one), then zero the pruned weights."""
        for block in self.factors():
            block.prune(sparsity)
            block.apply_masks()

    def after_step(self, step: int, total_steps: int) -> None:
        """After optimizer step `step`: prune to the schedule's sparsity, re-zero pruned weights."""
        self.prune(self.lslo_config.sparsity_at(step, total_steps))

    def sparsity(self) -> float:
        """The fraction of pruned LoRA weights over all languages."""
        masks = [m for block in self.factors() for m in (block.mask_A, block.mask_B)]
        return sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)

    def lslo_state_dict(self) -> dict[str, torch.Tensor]:
        """`{layer}.{proj}.{language}.{A,B,mask_A,mask_B}` -> tensor."""
        return {
            f"{i}.{p}.{lang}.{key}": tensor
            for (i, p), layer in self.lslo_layers().items()
            for lang, block in layer.loras.items()
            for key, tensor in block.state_dict().items()
        }

    def pair_update(self, pair: str) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(layer, proj) -> (B, A) of `pair`: its source's LoRA below the split, its target's above."""
        return {
            (i, p): layer.language_update(self.language(pair, i))
            for (i, p), layer in self.lslo_layers().items()
        }


def attach_language_lora(
    model: nn.Module, config: LanguageLoRAConfig, dtype=torch.float32
) -> LanguageLoRAModel:
    """Replace the target projections by LSLo layers (source side below `split`); freeze the base."""
    blocks = decoder_layers(model)
    if not 0 <= config.split <= len(blocks):
        raise MlasLoraError(f"LSLo split {config.split} out of range: the model has {len(blocks)} layers")
    for param in model.parameters():
        param.requires_grad_(False)
    source, target = Router(config.sources), Router(config.target_languages)
    for i, block in enumerate(blocks):
        router = source if i < config.split else target
        for proj in config.targets:
            base = projection(block, proj)
            if not isinstance(base, nn.Linear):
                raise MlasLoraError(f"LSLo: projection {proj} is a {type(base).__name__}, expected nn.Linear")
            layer = LanguageLoRALinear(base, router, config.rank, config.scaling, config.dropout, dtype)
            layer.train(base.training)
            parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
            setattr(block.get_submodule(parent), attr, layer)
    return LanguageLoRAModel(model, config, source, target)
