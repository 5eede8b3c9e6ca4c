"""Adapters that replace each target projection by a module of their own, and the files they share.

MELoRA and AFLoRA (methods/melora.py, methods/aflora.py) are not PEFT tuners, so they wrap every
target projection of every decoder layer themselves, as the routed student does (routed_lora.py):

    layer.self_attn.q_proj: nn.Linear  ──►  ProjectionAdapter(base = that nn.Linear, frozen; + factors)

The wrapper keeps the module's path, so an update that is a low-rank product B A (with the scaling
folded into B) is written as `base_model.model.<path>.lora_{A,B}.weight`: a PEFT LoRA of the plain
base model. Checkpoints are one safetensors file of every wrapper's tensors (factors and any
training-state buffers) and a JSON manifest:

    dir/adapter.safetensors   <module path>.<tensor name> for every wrapper (the base weights excluded)
    dir/adapter.json          {"format": ..., method settings}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from mlas_lora.adapters.export import VLLM_LORA_RANKS
from mlas_lora.adapters.projection import ProjectionWrapper
from mlas_lora.adapters.update_norms import lowrank_norm
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTION_PATHS, decoder_layers, projection
from mlas_lora.stage_files import write_text_atomic

WEIGHTS = "adapter.safetensors"
MANIFEST = "adapter.json"


class ProjectionAdapter(ProjectionWrapper):
    """A frozen nn.Linear `base` plus an update of the subclass's own; shows the base's shapes."""

    def __init__(self, base: nn.Linear):
        super().__init__(base)

    def lowrank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [out, R], A [R, in]), detached, with B A the layer's whole update (scaling in B)."""
        raise NotImplementedError


def wrap_projections(
    model: nn.Module, targets: Sequence[str], make: Callable[[nn.Linear], ProjectionAdapter]
) -> dict[str, ProjectionAdapter]:
    """Freeze `model` and replace each target projection of every decoder layer by `make(base)`."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in decoder_layers(model):
        for proj in targets:
            base = projection(layer, proj)
            if not isinstance(base, nn.Linear):
                raise MlasLoraError(
                    f"projection {proj} is a {type(base).__name__}, expected nn.Linear "
                    "(already wrapped, or a quantized layer)"
                )
            parent, _, attr = PROJECTION_PATHS[proj].rpartition(".")
            wrapper = make(base)
            wrapper.train(base.training)
            setattr(layer.get_submodule(parent), attr, wrapper)
    return adapter_layers(model)


def adapter_layers(model: nn.Module) -> dict[str, ProjectionAdapter]:
    """Module path -> wrapper, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ProjectionAdapter)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every wrapper's parameters and persistent buffers except its base layer's, by full name."""
    return {
        f"{name}.{key}": tensor
        for name, layer in adapter_layers(model).items()
        for key, tensor in layer.state_dict().items()
        if not key.startswith("base.")
    }


def save_adapter(model: nn.Module, path, manifest: dict) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state(model).items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return path


@torch.no_grad()
def load_adapter(model: nn.Module, path, expected_format: str) -> dict:
    """Copy a `save_adapter` folder into `model`'s wrappers (same names and shapes); its manifest."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise MlasLoraError(f"{path / MANIFEST}: no adapter manifest (expected a folder written by save)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != expected_format:
        raise MlasLoraError(
            f"{path / MANIFEST}: format {manifest.get('format')!r}, expected {expected_format!r}"
        )
    saved, target = load_file(str(path / WEIGHTS)), adapter_state(model)
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    wrong = [k for k in saved if k in target and saved[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise MlasLoraError(
            f"{path / WEIGHTS}: tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    for key, tensor in saved.items():
        target[key].copy_(tensor)
    return manifest


def serving_rank(rank: int) -> int:
    """The smallest vLLM LoRA rank >= `rank` (zero padding is exact), or `rank` above them all."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def export_peft(model: nn.Module, folder, base_model_name_or_path: str) -> Path:
    """One PEFT LoRA folder (scaling 1: lora_alpha == r) holding every wrapper's `lowrank_update`."""
    folder = Path(folder)
    layers = adapter_layers(model)
    updates = {name: layer.lowrank_update() for name, layer in layers.items()}
    rank = serving_rank(max(a.shape[0] for _, a in updates.values()))
    tensors = {}
    for name, (b, a) in updates.items():
        extra = rank - a.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = nn.functional.pad(
            a, (0, 0, 0, extra)
        ).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = nn.functional.pad(b, (0, extra)).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in layers}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    ).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def wrapped_update_norms(model: nn.Module) -> Callable[[], dict[str, float]]:
    """A callable giving {"all": mean over wrappers of ||Delta W||_F / ||W||_F} (update_norms.py)."""
    layers = list(adapter_layers(model).values())
    weights = [float(layer.base.weight.detach().double().norm()) for layer in layers]

    def norms() -> dict[str, float]:
        ratios = [lowrank_norm(*layer.lowrank_update()) / w for layer, w in zip(layers, weights, strict=True)]
        return {"all": sum(ratios) / len(ratios)} if ratios else {}

    return norms
