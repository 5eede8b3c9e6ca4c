"""Export the routed student (Eq. 9) to standard PEFT LoRA adapters, and save / load training checkpoints.

For serving, pair i needs W + s_g B_g A_g + s_s B_i A_i, which is one LoRA of rank r_gen + r_spe:
A = [A_g; A_i], B = [s_g B_g, s_s B_i] with the scalings folded into B and lora_alpha == r (scaling
1). In residual mode the frozen reference is subtracted too, A = [A_g; A_i; A0_g; A0_i] and
B = [s_g B_g, s_s B_i, -s_g B0_g, -s_s B0_i] (rank 2 (r_gen + r_spe)), so the adapter runs on the
original, untouched base. The rank is zero-padded up to the next rank vLLM accepts.

Layout written by `export_peft_adapters(routed, out)`:
    out/<pair>/adapter_config.json           PEFT LoraConfig (r == lora_alpha)
    out/<pair>/adapter_model.safetensors     keys base_model.model.<module>.lora_{A,B}.weight
    out/merged/<pair>/                       (merge=True) full merged model, HF format

Layout written by `save_routed(routed, dir)`:
    dir/routed_lora.safetensors              LoRA factors and residual buffers (A0, B0)
    dir/routed_lora.json                     manifest: format, base model, RoutedLoRAConfig fields,
                                             residual flag
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mlas_lora.adapters.routed_lora import (
    RoutedLoRAConfig,
    RoutedLoRALinear,
    RoutedLoRAModel,
    attach_routed_lora,
)
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.loading import base_model_id
from mlas_lora.stage_files import write_text_atomic

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed `max_lora_rank` values (vllm/config/lora.py, MaxLoRARanks)."""

DAMAGED = "the adapter folder is damaged: save or export the adapters again, or use an earlier checkpoint"

MANIFEST = "routed_lora.json"
WEIGHTS = "routed_lora.safetensors"
FORMAT = "mlas-lora-routed/1"


def serving_rank(rank: int, pad: bool = True) -> int:
    """The rank to export: `rank` itself if vLLM allows it, else (pad) the next allowed one."""
    if rank in VLLM_LORA_RANKS:
        return rank
    larger = [r for r in VLLM_LORA_RANKS if r > rank]
    if not larger:
        raise MlasLoraError(
            f"export: adapter rank {rank} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}; "
            "lower r_gen / r_spe"
        )
    if not pad:
        raise MlasLoraError(
            f"export: adapter rank {rank} is not one of vLLM's LoRA ranks {VLLM_LORA_RANKS}; "
            "choose r_gen + r_spe among them or export with pad_rank=True"
        )
    return larger[0]


def export_peft_adapters(
    routed: RoutedLoRAModel,
    out_dir,
    base_model_name_or_path: str,
    merge: bool = False,
    pad_rank: bool = True,
    tokenizer=None,
) -> dict[str, Path]:
    """Write one PEFT LoRA adapter folder per language pair; returns {pair: folder}."""
    out_dir = Path(out_dir)
    names = _module_names(routed)
    layers = routed.routed_layers()
    residual = any(layer.residual for layer in layers.values())
    rank = (routed.lora_config.r_gen + routed.lora_config.r_spe) * (2 if residual else 1)
    rank = serving_rank(rank, pad_rank)
    folders = {}
    for pair in routed.lora_config.pairs:
        tensors = {}
        for layer in layers.values():
            b, a = _padded(*layer.pair_update(pair), rank)
            prefix = f"base_model.model.{names[id(layer)]}"
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
        folder = out_dir / pair
        folder.mkdir(parents=True, exist_ok=True)
        _lora_config(routed, rank, base_model_name_or_path).save_pretrained(str(folder))
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        folders[pair] = folder
        if merge:
            _save_merged(routed, pair, out_dir / "merged" / pair, tokenizer)
    return folders


def _padded(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to `rank`: the product, hence the model, is unchanged."""
    extra = rank - a.shape[0]
    return torch.nn.functional.pad(b, (0, extra)), torch.nn.functional.pad(a, (0, 0, 0, extra))


def _module_names(routed: RoutedLoRAModel) -> dict[int, str]:
    return {id(m): n for n, m in routed.model.named_modules() if isinstance(m, RoutedLoRALinear)}


def _lora_config(routed: RoutedLoRAModel, rank: int, base: str) -> LoraConfig:
    names = _module_names(routed).values()
    subset = routed.lora_config.layers is not None
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}),
        layers_to_transform=sorted(routed.lora_config.layers) if subset else None,
        layers_pattern="layers" if subset else None,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


@torch.no_grad()
def _save_merged(routed: RoutedLoRAModel, pair: str, folder: Path, tokenizer) -> None:
    """Full HF checkpoint with W + B A of `pair` merged into every routed projection."""
    routed_names = set(_module_names(routed).values())
    merged = {}
    for layer in routed.routed_layers().values():
        merged[id(layer.base.weight)] = layer.merged_weight(pair)
    state = {}
    for key, tensor in routed.model.state_dict(keep_vars=True).items():
        name = _unrouted_key(key, routed_names)
        if name is not None:
            state[name] = merged.get(id(tensor), tensor.detach())
    routed.model.save_pretrained(str(folder), state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _unrouted_key(key: str, routed_names: set[str]) -> str | None:
    """The plain-model name of a state-dict key: `x.q_proj.base.weight` -> `x.q_proj.weight`; None for LoRA."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in routed_names:
            return ".".join(parts[:i] + parts[i + 1 :]) if parts[i] == "base" else None
    return key


def save_routed(routed: RoutedLoRAModel, path) -> Path:
    """Training checkpoint of the adapters: safetensors of factors (+ residual buffers) and a manifest."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in routed.lora_state_dict().items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    residual = any(layer.residual for layer in routed.routed_layers().values())
    manifest = {
        "format": FORMAT,
        "base_model": _base_of(routed),
        "config": routed.lora_config.to_dict(),
        "residual": residual,
        "tensors": len(tensors),
    }
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return path


def read_routed_manifest(path) -> dict:
    """The manifest of a `save_routed` folder, checked to be in this version's format."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise MlasLoraError(
            f"{manifest_path}: no routed LoRA manifest (expected a folder written by save_routed)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MlasLoraError(f"{manifest_path}: not valid JSON ({err}); {DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise MlasLoraError(
            f"{manifest_path}: expected a JSON object, found {type(manifest).__name__}; {DAMAGED}"
        )
    if manifest.get("format") != FORMAT:
        raise MlasLoraError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in ("config", "residual") if key not in manifest]
    if missing:
        raise MlasLoraError(f"{manifest_path}: missing {', '.join(map(repr, missing))}; {DAMAGED}")
    return manifest


def _saved_config(manifest: dict, where: Path) -> RoutedLoRAConfig:
    try:
        return RoutedLoRAConfig.from_dict(manifest["config"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise MlasLoraError(f"{where}: bad config ({type(err).__name__}: {err}); {DAMAGED}") from None


def _check_base(manifest: dict, model, where: Path) -> None:
    """Adapters fit only the model they were trained on; shapes alone cannot tell two models apart."""
    recorded = manifest.get("base_model", "")
    actual = _base_of(model)
    if recorded and actual and recorded != actual:
        raise MlasLoraError(
            f"{where}: these adapters were trained on {recorded}, not on {actual}; load them onto "
            "that model, or if both are the same weights pass check_base=False (CLI: --any-base)"
        )


def _base_of(model) -> str:
    """`base_model_id` of the checkpoint a model was loaded from ("" for one built in memory)."""
    return base_model_id(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise MlasLoraError(f"{path}: truncated or corrupt safetensors file ({err}); {DAMAGED}") from None


@torch.no_grad()
def load_routed(model, path, check_base: bool = True) -> RoutedLoRAModel:
    """Load a save_routed folder into a RoutedLoRAModel of the same config, or attach it to a base model.

    The adapters must come from the same base model (`base_model_id`) unless `check_base` is False.
    """
    manifest = read_routed_manifest(path)
    config = _saved_config(manifest, Path(path) / MANIFEST)
    if check_base:
        _check_base(manifest, model, Path(path) / MANIFEST)
    if not isinstance(model, RoutedLoRAModel):
        _check_size(config, model, Path(path))  # before anything is allocated
        fields = {k: v for k, v in config.to_dict().items() if k != "init"}
        model = attach_routed_lora(model, **fields)
    elif _shape(model.lora_config) != _shape(config):
        raise MlasLoraError(
            f"{Path(path) / MANIFEST}: saved config {config} does not match the model's {model.lora_config}"
        )
    if manifest["residual"]:
        model.freeze_initial()
    _copy_into(model, _load_weights(Path(path) / WEIGHTS), Path(path) / WEIGHTS)
    model.lora_config = config
    return model


def _check_size(config: RoutedLoRAConfig, model, path: Path) -> None:
    """Refuse a manifest whose ranks do not fit the model (the rule `model_problems` applies to a config),
    or whose LoRAs would hold more numbers than its weights file does: a crafted `r_gen: 100000000`
    asked for 12.8 GB before any tensor was compared."""
    from safetensors import safe_open

    from mlas_lora.models.arch import decoder_layers, projection

    config.validate()
    where, blocks = path / MANIFEST, decoder_layers(model)
    chosen = (
        range(len(blocks)) if config.layers is None else [i for i in config.layers if 0 <= i < len(blocks)]
    )
    shapes = [projection(blocks[i], t).weight.shape for i in chosen for t in config.targets]
    if not shapes:
        return  # no layer in range: attach_routed_lora says which
    rank, smallest = config.r_gen + config.r_spe, min(min(shape) for shape in shapes)
    if rank > smallest:
        raise MlasLoraError(
            f"{where}: rank r_gen + r_spe = {rank} exceeds the model's smallest targeted projection "
            f"dimension {smallest}; {DAMAGED}"
        )
    wanted = sum((config.r_gen + len(config.pairs) * config.r_spe) * (out + inp) for out, inp in shapes)
    try:
        with safe_open(str(path / WEIGHTS), "pt") as weights:
            held = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    except (SafetensorError, OSError) as err:
        raise MlasLoraError(
            f"{path / WEIGHTS}: truncated or corrupt safetensors file ({err}); {DAMAGED}"
        ) from None
    if wanted > held:
        raise MlasLoraError(
            f"{where}: its config asks for {wanted} LoRA numbers but {WEIGHTS} holds {held}; {DAMAGED}"
        )


def load_routed_for_inference(
    model: nn.Module, path, check_base: bool = True
) -> tuple[RoutedLoRAModel, Callable]:
    """Attach the adapters saved by `save_routed` at `path` to `model`, in eval mode.

    Returns the routed model and its `routing` context manager, which takes the pair names of a
    batch (as `translation.translate(batch_context=...)` passes them).
    """
    routed = load_routed(model, path, check_base).eval()
    return routed, routed.routing


def _shape(config: RoutedLoRAConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("init", "dropout")}


def _copy_into(model: RoutedLoRAModel, saved: dict[str, torch.Tensor], where: Path) -> None:
    target = model.lora_state_dict()
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    wrong = [k for k in saved if k in target and saved[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise MlasLoraError(
            f"{where}: tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    for key, tensor in saved.items():
        target[key].copy_(tensor)
