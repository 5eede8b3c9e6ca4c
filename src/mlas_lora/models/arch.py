"""Architecture introspection: decoder layers and the seven projections of each layer.

MLAS-LoRA scores and transfers the projections q, k, v, o (attention) and gate, up, down (MLP) of
every decoder layer. The decoder families we support all name them the same way under
`model.model.layers[i].{self_attn,mlp}`; anything else gets a clear "unsupported" error.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mlas_lora.errors import MlasLoraError

SUPPORTED_TYPES = ("qwen2", "llama", "mistral", "gemma2", "gemma3", "gemma3_text")

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

PROJECTION_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class ArchInfo:
    """Shapes that the transfer stage needs, read from a model config."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection's weight, as nn.Linear stores it."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q": (q, self.hidden_size),
            "k": (kv, self.hidden_size),
            "v": (kv, self.hidden_size),
            "o": (self.hidden_size, q),
            "gate": (self.intermediate_size, self.hidden_size),
            "up": (self.intermediate_size, self.hidden_size),
            "down": (self.hidden_size, self.intermediate_size),
        }
        return shapes[proj]


def text_config(config):
    """The language-model part of a config (Gemma 3 multimodal configs nest it)."""
    return getattr(config, "text_config", None) or config


def describe(config_or_model) -> ArchInfo:
    """ArchInfo of a transformers config or model; unsupported families raise."""
    config = getattr(config_or_model, "config", config_or_model)
    config = text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise MlasLoraError(
            f"unsupported architecture {model_type!r} ({type(config).__name__}); "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ArchInfo(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM."""
    describe(model)
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:  # Gemma 3 multimodal: model.model.language_model.layers
        layers = getattr(getattr(base, "language_model", None), "layers", None)
    if layers is None:
        raise MlasLoraError(f"unsupported architecture: no decoder layers found in {type(model).__name__}")
    return layers


def projection(layer: nn.Module, proj: str) -> nn.Linear:
    """One of the seven projections of a decoder layer, by short name (q, k, ..., down)."""
    module = layer
    for attr in PROJECTION_PATHS[proj].split("."):
        module = getattr(module, attr, None)
        if module is None:
            raise MlasLoraError(
                f"unsupported architecture: {type(layer).__name__} has no {PROJECTION_PATHS[proj]}"
            )
    return module


def projections(layer: nn.Module, names=PROJECTIONS) -> dict[str, nn.Linear]:
    return {p: projection(layer, p) for p in names}
