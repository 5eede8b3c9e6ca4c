"""Eq. (9): the routed multi-LoRA student layer, y = W x + s_g B_g A_g x + s_s B_i A_i x.

Every target projection keeps its frozen base W and gets one shared *general* LoRA (rank r_gen,
s_g = alpha_gen / r_gen) plus one *specific* LoRA per language pair (rank r_spe, s_s = alpha_spe /
r_spe). A sample of pair i uses the general LoRA and pair i's LoRA only, and a batch may mix pairs:

    x ──► W (frozen) ────────────────────────────────────────────────────────┐
    └──► [A_g; A_p1; ..; A_pP] x ──► ⊙ mask[sample] ──► [B_g, B_p1, .., B_pP] ──► + ──► y

The factors of the P pairs *present in the batch* are concatenated into one low-rank product and a
per-sample mask (which also carries the scalings) zeroes the columns of the other pairs: a mixed
batch costs two small matmuls, with no loop over samples (with more than DENSE_MAX_PAIRS pairs in a
batch, each sample's factors are gathered for a batched matmul instead). Pairs absent from the batch never enter
the graph, so their parameters keep `grad is None` and torch's AdamW skips them entirely (no
momentum, no weight decay): they stay bitwise unchanged. Trainers must clear gradients with
`zero_grad(set_to_none=True)` (torch's default) for this to hold after a pair was once present.

Residual mode (function-preserving init, like PiSSA): the specific LoRA differs per pair, so the
base cannot be corrected once for all pairs. We keep W frozen and unchanged, snapshot the initial
factors as frozen buffers (A0, B0) and compute W x + [lowrank(x; A, B) - lowrank(x; A0, B0)], as
one product of twice the rank written so that every term has a zero factor while A == A0 and
B == B0 (see `_product_factors`): at step 0 the student equals the base model bitwise, for every pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from mlas_lora.adapters.projection import ModelWrapper, ProjectionWrapper
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTION_PATHS, PROJECTIONS, decoder_layers, projection

INIT_MODES = ("default", "add", "residual")

DENSE_MAX_PAIRS = 4
"""Up to this many pairs in a batch, mask one concatenated product (rank r_gen + P r_spe: plain GEMMs,
tiny saved activations); above it, gather each sample's factors for a batched matmul (rank r_gen +
r_spe per token, but autograd keeps a [batch, r, in + out] copy per layer). Not tuned on a GPU yet."""


@dataclass(frozen=True)
class RoutedLoRAConfig:
    """Shape of the routed student: which projections, which pairs, ranks and scalings."""

    pairs: tuple[str, ...]
    targets: tuple[str, ...] = PROJECTIONS
    r_gen: int = 8
    r_spe: int = 8
    alpha_gen: float = 16.0
    alpha_spe: float = 16.0
    dropout: float = 0.0
    layers: tuple[int, ...] | None = None
    """Decoder layer indices that get LoRAs; None means every layer."""
    init: str = field(default="default")
    """How the factors were initialised: PEFT-like `default`, or `add` / `residual` from factors."""

    @property
    def scaling_gen(self) -> float:
        return self.alpha_gen / self.r_gen if self.r_gen else 0.0

    @property
    def scaling_spe(self) -> float:
        return self.alpha_spe / self.r_spe if self.r_spe else 0.0

    def validate(self) -> None:
        """Raise one MlasLoraError listing every problem."""
        problems = []
        if not self.pairs:
            problems.append("pairs is empty: give at least one language pair like 'en-de'")
        if "general" in self.pairs:
            problems.append("'general' is reserved for the shared LoRA and cannot name a pair")
        if len(set(self.pairs)) != len(self.pairs):
            problems.append(f"pairs has duplicates: {list(self.pairs)}")
        problems += [
            f"pair name {p!r} must be non-empty and contain no '.'" for p in self.pairs if not p or "." in p
        ]
        problems += [
            f"unknown target {t!r} (expected some of {PROJECTIONS})"
            for t in self.targets
            if t not in PROJECTIONS
        ]
        problems += [
            f"{k} must be an int >= 0, got {v!r}"
            for k, v in (("r_gen", self.r_gen), ("r_spe", self.r_spe))
            if not isinstance(v, int) or isinstance(v, bool) or v < 0
        ]
        if self.r_gen == 0 and self.r_spe == 0:
            problems.append("r_gen and r_spe are both 0: at least one LoRA needs a rank")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_MODES:
            problems.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if problems:
            raise MlasLoraError("invalid routed LoRA config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RoutedLoRAConfig:
        d = dict(d)
        for key in ("pairs", "targets", "layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


class LoRAFactors(nn.Module):
    """One LoRA, A [r, in] kaiming-uniform and B [out, r] zero as in PEFT, so B A starts at zero.

    A0 / B0 are the frozen initial factors of residual mode (None otherwise). Rank 0 is an absent
    LoRA (empty factors, no update): the structures without a general or without per-pair LoRAs.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        if rank:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.register_buffer("A0", None)
        self.register_buffer("B0", None)

    def snapshot(self) -> None:
        """Freeze a copy of the current factors as the residual-mode reference."""
        self.A0 = self.A.detach().clone()
        self.B0 = self.B.detach().clone()


class Router:
    """The pair of each sample for the next forward / generate calls, shared by all routed layers."""

    def __init__(self, pairs: Sequence[str]):
        self.pairs = tuple(pairs)
        self.clear()

    def clear(self) -> None:
        self.present: tuple[int, ...] = ()
        self._slots: list[int] | None = None
        self._masks: dict = {}

    def state(self) -> tuple:
        return self.present, self._slots, self._masks

    def restore(self, state: tuple) -> None:
        self.present, self._slots, self._masks = state

    def set(self, pair_ids) -> None:
        """Route sample b to pair `pair_ids[b]` (ints, pair names or a LongTensor [batch])."""
        ids = self._indices(pair_ids)
        self.present = tuple(sorted(set(ids)))
        slot = {p: i for i, p in enumerate(self.present)}
        self._slots = [slot[p] for p in ids]
        self._masks = {}

    def _indices(self, pair_ids) -> list[int]:
        if isinstance(pair_ids, torch.Tensor):
            pair_ids = pair_ids.reshape(-1).tolist()
        ids = [self.pairs.index(p) if isinstance(p, str) and p in self.pairs else p for p in pair_ids]
        bad = [p for p in ids if not isinstance(p, int) or not 0 <= p < len(self.pairs)]
        if bad or not ids:
            raise MlasLoraError(
                f"routing: expected a non-empty list of pair indices in [0, {len(self.pairs)}) "
                f"or names in {list(self.pairs)}; bad entries: {bad[:5]}"
            )
        return ids

    def mask(
        self, batch: int, r_gen: int, r_spe: int, s_gen: float, s_spe: float, device, dtype
    ) -> torch.Tensor:
        """[batch, r_gen + P r_spe]: s_gen on general columns, s_spe on the sample's pair, 0 elsewhere."""
        key = (batch, r_gen, r_spe, s_gen, s_spe, device, dtype)
        if key not in self._masks:
            slots = self.slots(batch, device)
            spe = F.one_hot(slots, len(self.present)).repeat_interleave(r_spe, dim=1) * s_spe
            gen = torch.full((batch, r_gen), s_gen, device=device)
            self._masks[key] = torch.cat([gen, spe], dim=1).to(dtype)
        return self._masks[key]

    def slots(self, batch: int, device) -> torch.Tensor:
        """LongTensor [batch]: for each row, the position of its pair in `present`."""
        if self._slots is None:
            raise MlasLoraError(
                "routed LoRA: no routing set; wrap the call in `with model.routing(pair_ids):`"
            )
        key = ("slots", batch, device)
        if key not in self._masks:
            n = len(self._slots)
            if batch % n:
                raise MlasLoraError(f"routed LoRA: batch of {batch} rows but routing was set for {n} samples")
            # generate() with beams / num_return_sequences repeats each sample batch // n times in place
            self._masks[key] = torch.tensor(self._slots, device=device).repeat_interleave(batch // n)
        return self._masks[key]


class RoutedLoRALinear(ProjectionWrapper):
    """A frozen nn.Linear plus the general and per-pair LoRAs of Eq. (9), routed per sample."""

    def __init__(self, base: nn.Linear, router: Router, config: RoutedLoRAConfig, dtype=None):
        super().__init__(base)
        self.router = router
        self.pairs = config.pairs
        self.r_gen, self.r_spe = config.r_gen, config.r_spe
        self.scaling_gen, self.scaling_spe = config.scaling_gen, config.scaling_spe
        shape = (base.in_features, base.out_features)
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.general = LoRAFactors(*shape, config.r_gen, **kw)
        self.specific = nn.ModuleDict({p: LoRAFactors(*shape, config.r_spe, **kw) for p in config.pairs})
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged_pair: str | None = None
        self.merged_copy: torch.Tensor | None = None
        """W + B A in a wider dtype than W's (RoutedLoRAModel.merged with a dtype), else None."""

    @property
    def residual(self) -> bool:
        return self.general.A0 is not None

    def factors(self, pair: str) -> tuple[LoRAFactors, LoRAFactors]:
        return self.general, self.specific[pair]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_copy is not None:  # RoutedLoRAModel.merged(pair, dtype): W + B A kept wide
            w = self.merged_copy
            bias = None if self.base.bias is None else self.base.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
        y = self.base(x)
        if self.merged_pair is not None:  # the pair's update is in base.weight (RoutedLoRAModel.merged)
            return y
        autocast = torch.is_autocast_enabled(x.device.type)
        h_dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.general.A.dtype
        x = self.dropout(x)
        if not autocast:
            x = x.to(self.general.A.dtype)
        if len(self.router.present) <= DENSE_MAX_PAIRS:
            dense = self._dense_inference if not torch.is_grad_enabled() else self._dense
            return y + dense(x, h_dtype).to(y.dtype)
        delta = self._gathered(x, h_dtype, initial=False)
        if self.residual:
            delta = delta - self._gathered(x, h_dtype, initial=True)
        return y + delta.to(y.dtype)

    def pair_update(self, pair: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, R], A [R, in]) with B A equal to `pair`'s whole update of this layer, scalings in B.

        R = r_gen + r_spe, doubled in residual mode, where the frozen reference is subtracted:
        A = [A_g; A_i; A0_g; A0_i], B = [s_g B_g, s_s B_i, -s_g B0_g, -s_s B0_i].
        """
        blocks = [(self.scaling_gen, self.general), (self.scaling_spe, self.specific[pair])]
        bs = [s * f.B.detach() for s, f in blocks]
        as_ = [f.A.detach() for _, f in blocks]
        if self.residual:
            bs += [-s * f.B0 for s, f in blocks]
            as_ += [f.A0 for _, f in blocks]
        return torch.cat(bs, dim=1), torch.cat(as_, dim=0)

    @torch.no_grad()
    def merged_weight(self, pair: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W + B A of `pair` (computed in float32), in `dtype` (default: the base weight's dtype).

        In bfloat16 (about 3 significant digits) a small update B A is partly rounded away: the
        merged layer is then not the trained one.
        """
        b, a = self.pair_update(pair)
        weight = self.base.weight
        return (weight.float() + b.float() @ a.float()).to(dtype or weight.dtype)

    def _blocks(self, initial: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A and B of the general LoRA, then of each pair present in the batch (A0 / B0 if initial)."""
        blocks = [self.general] + [self.specific[self.pairs[p]] for p in self.router.present]
        if initial:
            return [f.A0 for f in blocks], [f.B0 for f in blocks]
        return [f.A for f in blocks], [f.B for f in blocks]

    def _dense(self, x: torch.Tensor, h_dtype) -> torch.Tensor:
        """B_cat (mask ⊙ A_cat x): one low-rank product over the general LoRA and the present pairs."""
        a, b = self._product_factors()
        return F.linear(F.linear(x, a) * self._mask(x, h_dtype), b)

    def _product_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat) of the general LoRA and the present pairs, residual mode folded in.

        Residual mode needs B (m ⊙ A x) - B0 (m ⊙ A0 x). We compute it as one product of twice the
        rank, [B - B0, B0] ([m, m] ⊙ [A; A - A0] x), which is the same sum but is *exactly* zero while
        A == A0 and B == B0 (every term has a zero factor), so at step 0 the student equals the base
        bitwise, and training pays for one pair of GEMMs instead of two.
        """
        a, b = self._blocks(initial=False)
        a, b = torch.cat(a), torch.cat(b, dim=1)
        if not self.residual:
            return a, b
        a0, b0 = self._frozen_initial()
        return torch.cat([a, a - a0]), torch.cat([b - b0, b0], dim=1)

    def _mask(self, x: torch.Tensor, h_dtype) -> torch.Tensor:
        """The router's per-sample mask, doubled in residual mode, shaped to broadcast over x."""
        batch = x.shape[0]
        mask = self.router.mask(
            batch, self.r_gen, self.r_spe, self.scaling_gen, self.scaling_spe, x.device, h_dtype
        )
        if self.residual:
            mask = torch.cat([mask, mask], dim=1)
        return mask.view(batch, *([1] * (x.dim() - 2)), mask.shape[-1])

    def _frozen_initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cat A0, cat B0) over the general LoRA and the present pairs, cached per routing."""
        a0, b0 = self._blocks(initial=True)
        key = (self.router.present, a0[0].device, *(t._version for t in a0 + b0))
        return self._memo("_initial_cache", key, lambda: (torch.cat(a0), torch.cat(b0, dim=1)))

    def _memo(self, attr: str, key: tuple, build: Callable[[], tuple]) -> tuple:
        """`build()`, kept in `self.<attr>` and reused while `key` (routing, versions) is unchanged."""
        cached = getattr(self, attr, None)
        if cached is None or cached[0] != key:
            cached = (key, build())
            setattr(self, attr, cached)
        return cached[1]

    def _dense_inference(self, x: torch.Tensor, h_dtype) -> torch.Tensor:
        """`_dense` with the product's factors cached in the compute dtype.

        Generation calls every layer once per token with the same routing and frozen factors, so
        the concatenation need not be redone each time. The cache is keyed by the pairs present and
        the factors' version counters, so an optimizer step or a load invalidates it.
        """
        blocks = [self.general] + [self.specific[self.pairs[p]] for p in self.router.present]
        tensors = [t for f in blocks for t in (f.A, f.B, f.A0, f.B0) if t is not None]
        key = (self.router.present, h_dtype, x.device, *(t._version for t in tensors))

        def build():
            a, b = self._product_factors()
            return a.to(h_dtype), b.to(h_dtype)

        a_cat, b_cat = self._memo("_inference_cache", key, build)
        return F.linear(F.linear(x, a_cat) * self._mask(x, h_dtype), b_cat)

    def _gathered(self, x: torch.Tensor, h_dtype, initial: bool) -> torch.Tensor:
        """General LoRA as one product; each sample's pair factors gathered into a batched matmul."""
        (a_gen, *a_spe), (b_gen, *b_spe) = self._blocks(initial)
        out = F.linear(F.linear(x, a_gen) * self.scaling_gen, b_gen)
        slots = self.router.slots(x.shape[0], x.device)
        a, b = torch.stack(a_spe)[slots], torch.stack(b_spe)[slots]  # [batch, r, in], [batch, out, r]
        h = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), a.transpose(1, 2)) * self.scaling_spe
        return out + torch.bmm(h, b.transpose(1, 2)).view(out.shape)

    def extra_repr(self) -> str:
        return f"pairs={list(self.pairs)}, r_gen={self.r_gen}, r_spe={self.r_spe}, residual={self.residual}"


class RoutedLoRAModel(ModelWrapper):
    """A causal LM whose target projections are RoutedLoRALinear; `routing()` picks each sample's pair."""

    def __init__(self, model: nn.Module, config: RoutedLoRAConfig, router: Router):
        super().__init__(model)
        self.lora_config = config
        self.router = router

    def routed_layers(self) -> dict[tuple[int, str], RoutedLoRALinear]:
        """(layer index, projection) -> routed layer, in model order."""
        layers = decoder_layers(self.model)
        idx = self.lora_config.layers if self.lora_config.layers is not None else range(len(layers))
        return {(i, p): projection(layers[i], p) for i in idx for p in self.lora_config.targets}

    def set_routing(self, pair_ids) -> None:
        """Route the following calls: sample b uses pair `pair_ids[b]`; None clears the routing."""
        self.router.clear() if pair_ids is None else self.router.set(pair_ids)

    @contextmanager
    def routing(self, pair_ids) -> Iterator[RoutedLoRAModel]:
        """`with model.routing(ids): model(...)` or `model.generate(...)`; restores the previous routing."""
        saved = self.router.state()
        self.router.set(pair_ids)
        try:
            yield self
        finally:
            self.router.restore(saved)

    @contextmanager
    def merged(self, pair: str, dtype: torch.dtype | None = None) -> Iterator[RoutedLoRAModel]:
        """Inference for one pair with its update merged into the weights; routing is ignored inside.

        dtype None: every routed layer computes (W + B A) x with the pair's general + specific update
        folded into W in W's dtype (like PEFT's merge), at the base model's speed; in bfloat16 a small
        update is partly rounded away, so this is *not* the trained function (see docs/design-choices.md). A wider
        dtype (float32) keeps W + B A in a copy of that dtype and computes those layers in it: exact,
        but twice the weight bytes per step. On exit the original weights are put back bitwise.
        Not for training: the LoRAs get no gradient here.
        """
        if pair not in self.lora_config.pairs:
            raise MlasLoraError(f"merged: unknown pair {pair!r}; pairs are {list(self.lora_config.pairs)}")
        originals = {}
        try:
            with torch.no_grad():
                for layer in self.routed_layers().values():
                    layer.merged_pair = pair
                    if dtype is not None and dtype != layer.base.weight.dtype:
                        layer.merged_copy = layer.merged_weight(pair, dtype)
                        continue
                    originals[layer] = layer.base.weight.detach().clone()
                    layer.base.weight.copy_(layer.merged_weight(pair))
            yield self
        finally:
            with torch.no_grad():
                for layer in self.routed_layers().values():
                    if layer in originals:
                        layer.base.weight.copy_(originals[layer])
                    layer.merged_pair, layer.merged_copy = None, None

    def freeze_initial(self) -> None:
        """Residual mode: snapshot every LoRA's current factors as its frozen reference (A0, B0)."""
        for layer in self.routed_layers().values():
            for block in (layer.general, *layer.specific.values()):
                block.snapshot()

    def lora_parameters(self, pair: str | None = None) -> Iterator[nn.Parameter]:
        """Trainable parameters: all of them, or (pair given) the general LoRAs and that pair's."""
        for layer in self.routed_layers().values():
            blocks = [layer.general, *layer.specific.values()] if pair is None else layer.factors(pair)
            for block in blocks:
                yield from block.parameters()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA factors and residual buffers, keyed by their name inside the wrapped model."""
        names = {id(m): n for n, m in self.model.named_modules()}
        out = {}
        for layer in self.routed_layers().values():
            for key, tensor in layer.state_dict().items():
                if not key.startswith("base."):
                    out[f"{names[id(layer)]}.{key}"] = tensor
        return out


def attach_routed_lora(
    model: nn.Module,
    pairs: Sequence[str],
    targets: Sequence[str] = PROJECTIONS,
    r_gen: int = 8,
    r_spe: int = 8,
    alpha_gen: float = 16.0,
    alpha_spe: float = 16.0,
    dropout: float = 0.0,
    layers: Sequence[int] | None = None,
    lora_dtype: torch.dtype | None = torch.float32,
) -> RoutedLoRAModel:
    """Replace the target projections of `model` in place by routed LoRA layers; freeze the base.

    LoRA weights default to float32 even on a bf16 model (as PEFT's autocast_adapter_dtype does), so
    small updates are not lost; `lora_dtype=None` keeps the base dtype.
    """
    config = RoutedLoRAConfig(
        tuple(pairs),
        tuple(targets),
        r_gen,
        r_spe,
        float(alpha_gen),
        float(alpha_spe),
        float(dropout),
        None if layers is None else tuple(layers),
    )
    config.validate()
    blocks = decoder_layers(model)
    bad = [i for i in config.layers or () if not 0 <= i < len(blocks)]
    if bad:
        raise MlasLoraError(f"layers {bad} out of range: the model has {len(blocks)} decoder layers")
    for param in model.parameters():
        param.requires_grad_(False)
    router = Router(config.pairs)
    for i in config.layers if config.layers is not None else range(len(blocks)):
        for proj in config.targets:
            _replace(blocks[i], proj, router, config, lora_dtype)
    return RoutedLoRAModel(model, config, router)


def _replace(layer: nn.Module, proj: str, router: Router, config: RoutedLoRAConfig, dtype) -> None:
    base = projection(layer, proj)
    if not isinstance(base, nn.Linear):
        raise MlasLoraError(
            f"projection {proj} is a {type(base).__name__}, expected nn.Linear "
            "(already routed, or a quantized layer)"
        )
    parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
    routed = RoutedLoRALinear(base, router, config, dtype)
    routed.train(base.training)  # new modules default to training mode: keep dropout off on an eval model
    setattr(layer.get_submodule(parent), attr, routed)


@torch.no_grad()
def init_from_factors(
    model: RoutedLoRAModel, factors: dict, mode: str = "add", teacher_scale: float = 1.0
) -> None:
    """Set the LoRAs from teacher factors: factors[(layer, proj)] = {"general": (B, A), "en-de": (B, A)}.

    B is [out, r], A is [r, in] in the student's projection shape. `add` (Eq. 9 literally): at step 0
    the student computes W + teacher_scale (B_gen A_gen + B_pair A_pair): each LoRA's A is the given
    A (Eq. 8: V_r^T) unchanged, and its B the given B times teacher_scale / (alpha / r), which the
    LoRA scaling alpha / r undoes (`_set_effective`). `residual`: the same
    trainable factors, but their initial values are also frozen as A0 / B0 and subtracted, so at
    step 0 the student equals the base exactly (see the module docstring). Layers or pairs missing
    from `factors` keep their current (PEFT-like) init.
    """
    if mode not in ("add", "residual"):
        raise MlasLoraError(f"init_from_factors: mode must be 'add' or 'residual', got {mode!r}")
    routed = model.routed_layers()
    unknown = [k for k in factors if k not in routed]
    if unknown:
        raise MlasLoraError(
            f"init_from_factors: {unknown[:5]} are not routed (layer, projection) keys; "
            f"routed layers are {model.lora_config.layers or 'all'} x {list(model.lora_config.targets)}"
        )
    for key, by_block in factors.items():
        layer = routed[key]
        for block_name, (b, a) in by_block.items():
            block, scaling = _block(layer, key, block_name)
            _set_effective(
                block, scaling, torch.as_tensor(b), torch.as_tensor(a), teacher_scale, f"{key} {block_name}"
            )
    if mode == "residual":
        model.freeze_initial()
    model.lora_config = replace(model.lora_config, init=mode)


def _block(layer: RoutedLoRALinear, key, name: str) -> tuple[LoRAFactors, float]:
    if name == "general":
        return layer.general, layer.scaling_gen
    if name not in layer.specific:
        raise MlasLoraError(
            f"init_from_factors: {key} has factors for unknown pair {name!r}; "
            f"pairs are {list(layer.pairs)} (plus 'general')"
        )
    return layer.specific[name], layer.scaling_spe


def _set_effective(
    block: LoRAFactors, scaling: float, b: torch.Tensor, a: torch.Tensor, scale: float, where: str
):
    """Eq. (8) kept exactly: A = a (V_r^T, orthonormal rows), B = (scale / scaling) b (U_r S_r).

    The one constant c = teacher_scale / (alpha / r) sits in B alone, so the initial update
    scaling * B A = teacher_scale * U_r S_r V_r^T is teacher_scale times the rank-r SVD of the
    teacher submatrix, and A keeps unit-norm rows whatever the scalings (teacher_scale 0: B = 0).
    """
    if tuple(b.shape) != tuple(block.B.shape) or tuple(a.shape) != tuple(block.A.shape):
        raise MlasLoraError(
            f"init_from_factors: {where}: expected B {tuple(block.B.shape)} and A "
            f"{tuple(block.A.shape)}, got B {tuple(b.shape)} and A {tuple(a.shape)}"
        )
    block.A.copy_(a.to(block.A.dtype))
    block.B.copy_((b * (scale / scaling)).to(block.B.dtype))
