"""Houlsby et al. (2019) bottleneck adapters: h + W_up f(W_down h + b1) + b2, two per decoder layer.

Houlsby's Transformer layer has one adapter after the attention output projection and one after the
feed-forward output, each applied to the sub-layer's output before the residual add (and before the
layer norm of post-LN BERT). In our decoders that is the output of `o_proj` and of `down_proj`:

    x ─► attn ─► o_proj ─► [adapter] ─► (+ x)              Qwen2, Llama (pre-norm)
    x ─► attn ─► o_proj ─► [adapter] ─► post_attention_layernorm ─► (+ x)    Gemma 2 / 3

and the same for the MLP with `down_proj` (Gemma's post_feedforward_layernorm). Wrapping the two
projections places them there on every supported family, with no model-specific code.

    h ─► W_down [m, d] ─► + b1 ─► GELU ─► W_up [d, m] ─► + b2 ─► + h

Initialisation follows Houlsby's code (google-research/adapter-bert, `feedforward_adapter`): W_down
and W_up truncated normal (std `init_scale` = 1e-3, cut at 2 std), biases zero, GELU (the tanh
approximation, BERT's `gelu`): near identity, not exactly identity; with W_up = 0 and b2 = 0 the model
is the base model bitwise (tests). The adapters are kept in float32 on a bf16 base, as PEFT keeps its
LoRAs (`autocast_adapter_dtype`). The original also trains the layer norms; we keep them frozen, so
every trained parameter is an adapter's.

Files (`save_bottleneck` / `load_bottleneck`): `bottleneck.safetensors` (keys
`layers.<i>.<o|down>.{down,up}.{weight,bias}`) + `bottleneck.json` (format, sizes, placements).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mlas_lora.adapters.projection import ProjectionWrapper
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTION_PATHS, decoder_layers, projection
from mlas_lora.stage_files import write_text_atomic

PLACEMENTS = ("o", "down")
"""The projections whose output gets an adapter: attention output and MLP output (Houlsby Fig. 2)."""
FORMAT = "mlas-lora-bottleneck/1"
WEIGHTS = "bottleneck.safetensors"
MANIFEST = "bottleneck.json"
ACTIVATION = "gelu_tanh"


@dataclass(frozen=True)
class BottleneckConfig:
    bottleneck: int
    """m, the adapter's hidden size (Houlsby: 8-256, 64 in most of their runs)."""
    init_scale: float = 1e-3
    """Std of the truncated-normal W_down and W_up (adapter-bert's `adapter_init_scale`)."""


def parameters_per_layer(hidden: int, bottleneck: int) -> int:
    """Two adapters of size m on a d-wide stream: 2 (2 d m + m + d)."""
    return 2 * (2 * hidden * bottleneck + bottleneck + hidden)


def matching_bottleneck(hidden: int, num_layers: int, budget: int) -> int:
    """The m whose adapters come nearest `budget` trainable parameters (at least 1)."""
    exact = (budget / (2 * num_layers) - hidden) / (2 * hidden + 1)
    candidates = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
    return min(candidates, key=lambda m: (abs(num_layers * parameters_per_layer(hidden, m) - budget), m))


class BottleneckAdapter(nn.Module):
    """h + W_up GELU(W_down h + b1) + b2, computed in the adapter's dtype, returned in h's."""

    def __init__(self, features: int, config: BottleneckConfig, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(features, config.bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(config.bottleneck, features, device=device, dtype=dtype)
        self.act = nn.GELU(approximate="tanh")
        std = config.init_scale
        with torch.no_grad():
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(h.device.type)
        x = h if autocast else h.to(self.down.weight.dtype)
        return h + self.up(self.act(self.down(x))).to(h.dtype)


class AdaptedProjection(ProjectionWrapper):
    """A frozen projection followed by its bottleneck adapter: adapter(base(x))."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter):
        super().__init__(base)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


def attach_bottleneck(model: nn.Module, config: BottleneckConfig, dtype=torch.float32) -> nn.Module:
    """Freeze `model` and wrap o_proj and down_proj of every decoder layer with an adapter (in place)."""
    if config.bottleneck < 1:
        raise MlasLoraError(f"bottleneck must be >= 1, got {config.bottleneck}")
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        for proj in PLACEMENTS:
            base = projection(layer, proj)
            if not isinstance(base, nn.Linear):
                raise MlasLoraError(
                    f"{PROJECTION_PATHS[proj]} is a {type(base).__name__}, expected nn.Linear"
                )
            adapter = BottleneckAdapter(
                base.out_features, config, base.weight.device, dtype or base.weight.dtype
            )
            wrapped = AdaptedProjection(base, adapter).train(base.training)
            parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
            setattr(layer.get_submodule(parent), attr, wrapped)
    model.bottleneck_config = config
    return model


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """{"layers.<i>.<o|down>": adapter} of a model with attached adapters."""
    return {
        f"layers.{i}.{proj}": projection(layer, proj).adapter
        for i, layer in enumerate(decoder_layers(model))
        for proj in PLACEMENTS
    }


def bottleneck_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().contiguous()
        for name, adapter in adapters(model).items()
        for key, value in adapter.state_dict().items()
    }


def save_bottleneck(model: nn.Module, folder: Path, base_model: str | None = None) -> Path:
    """`bottleneck.safetensors` + `bottleneck.json` in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(bottleneck_state(model), str(folder / WEIGHTS))
    manifest = {
        "format": FORMAT,
        **asdict(model.bottleneck_config),
        "activation": ACTIVATION,
        "placements": list(PLACEMENTS),
        "num_layers": len(decoder_layers(model)),
        "base_model": base_model,
    }
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))
    return folder


def read_bottleneck_config(folder: Path) -> BottleneckConfig:
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise MlasLoraError(f"{folder}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}")
    return BottleneckConfig(manifest["bottleneck"], manifest["init_scale"])


@torch.no_grad()
def load_bottleneck(model: nn.Module, folder: Path) -> None:
    """Copy saved adapter weights into a model with attached adapters of the same shape."""
    folder = Path(folder)
    if read_bottleneck_config(folder).bottleneck != model.bottleneck_config.bottleneck:
        raise MlasLoraError(f"{folder}: bottleneck size differs from the model's adapters")
    saved, params = load_file(str(folder / WEIGHTS)), bottleneck_state(model)
    if set(saved) != set(params):
        raise MlasLoraError(f"{folder}/{WEIGHTS}: keys differ from the model's adapters")
    for name, adapter in adapters(model).items():
        adapter.load_state_dict({k: saved[f"{name}.{k}"] for k in adapter.state_dict()})
