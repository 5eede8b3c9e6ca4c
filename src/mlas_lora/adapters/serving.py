"""Checks of exported PEFT adapters against what vLLM's multi-LoRA serving accepts, and the
`vllm serve` command for a run.

vLLM reads `adapter_config.json` through its PEFTHelper, which refuses a rank above
`--max-lora-rank` (itself one of VLLM_LORA_RANKS), a bias other than "none" (unless the server
enables LoRA bias), DoRA, and `modules_to_save`; it applies LoRA to the linear layers of its model
implementation (TARGETS for the decoder families we export). PEFT must also load the folder: its
config must parse and every tensor must be a `lora_A` / `lora_B` weight of rank r.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mlas_lora.adapters.export import VLLM_LORA_RANKS

TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Projections of Qwen2 / Llama / Gemma 2-3 decoder layers that vLLM's LoRA layers wrap."""


def adapter_problems(folder: Path) -> list[str]:
    """Everything in one PEFT adapter folder that vLLM or PEFT would refuse (empty: servable)."""
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        return [f"{folder}: not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        return [f"{config_path}:{err.lineno}: not valid JSON ({err.msg})"]
    out = []
    if config.get("peft_type", "LORA") != "LORA":
        out.append(f"{config_path}: peft_type {config.get('peft_type')!r}; vLLM serves LORA adapters only")
    rank = config.get("r")
    if rank not in VLLM_LORA_RANKS:
        out.append(f"{config_path}: rank {rank} is not one of vLLM's ranks {VLLM_LORA_RANKS}")
    if config.get("bias", "none") != "none":
        out.append(f"{config_path}: bias {config['bias']!r}; vLLM needs 'none' unless served with LoRA bias")
    if config.get("use_dora"):
        out.append(f"{config_path}: DoRA, which vLLM does not serve")
    if config.get("modules_to_save"):
        out.append(f"{config_path}: modules_to_save {config['modules_to_save']}, which vLLM does not load")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if unknown := sorted(set(targets) - TARGETS):
        out.append(
            f"{config_path}: target modules {unknown} are not LoRA layers in vLLM (known: {sorted(TARGETS)})"
        )
    return out + _tensor_problems(weights_path, rank)


def _tensor_problems(path: Path, rank) -> list[str]:
    from safetensors import safe_open

    out = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if key.endswith("lora_A.weight") and shape[0] != rank:
                    out.append(f"{path}: {key} has rank {shape[0]}, the config says {rank}")
                elif key.endswith("lora_B.weight") and shape[1] != rank:
                    out.append(f"{path}: {key} has rank {shape[1]}, the config says {rank}")
                elif not key.endswith(("lora_A.weight", "lora_B.weight")):
                    out.append(f"{path}: {key} is not a LoRA factor (vLLM and PEFT load lora_A / lora_B)")
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        out.append(f"{path}: unreadable safetensors ({type(err).__name__}: {err})")
    return out


def adapter_folders(export: Path) -> dict[str, Path]:
    """name -> PEFT adapter folder under an export: the folder itself, or one per pair."""
    export = Path(export)
    if (export / "adapter_config.json").is_file():
        return {export.name: export}
    return {p.parent.name: p.parent for p in sorted(export.glob("*/adapter_config.json"))}


def vllm_command(base: str, adapters: dict[str, Path]) -> str:
    """The `vllm serve` line that serves every adapter, each under its name."""
    ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 0) for p in adapters.values()]
    max_rank = min((r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1)), default=VLLM_LORA_RANKS[-1])
    modules = " ".join(shlex.quote(f"{name}={path}") for name, path in adapters.items())
    return f"vllm serve {shlex.quote(base)} --enable-lora --max-loras {len(adapters)} --max-lora-rank {max_rank} --lora-modules {modules}"
