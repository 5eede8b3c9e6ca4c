"""Trained adapters onto a base model for `mlas-lora translate`, from any folder a run leaves.

routed folder      routed_lora.json + routed_lora.safetensors (`save_routed`, a MLAS-LoRA
                   checkpoint's adapters/): each segment runs through its pair's LoRAs (Eq. 9),
                   as the run decoded
PEFT folder        adapter_config.json + adapter_model.safetensors: one pair of an export
                   (adapters-mlas-lora/en-de), a PEFT baseline's export (adapters-lora/) or
                   checkpoint, any PEFT adapter; loaded with PEFT, one adapter for every segment
export of pairs    adapters-<system>/ with one PEFT folder per pair: the folder of `pair`
training folder    train-<system>/: the adapters of its newest checkpoint, routed or PEFT
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlas_lora.adapters.export import MANIFEST, load_routed_for_inference
from mlas_lora.errors import MlasLoraError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
EXPECTED = (
    "expected a routed MLAS-LoRA folder (routed_lora.json), a PEFT adapter folder "
    "(adapter_config.json + adapter_model.safetensors), an export adapters-<system>/ with one PEFT "
    "folder per pair, or a training folder train-<system>/ with a checkpoint"
)


def find_adapters(path, pair: str) -> tuple[str, Path]:
    """("routed" or "peft", the folder to load) for what `path` is, the direction `pair` chosen from
    an export of several pairs; any other folder is one error saying what was expected."""
    from mlas_lora.training.trainer import complete_checkpoints

    path = Path(path)
    if not path.is_dir():
        raise MlasLoraError(f"{path}: no such folder; {EXPECTED}")
    if (path / MANIFEST).is_file():
        return "routed", path
    if (path / PEFT_CONFIG).is_file():
        return "peft", _peft_folder(path, pair)
    if (path / "checkpoints").is_dir():
        return _checkpoint_adapters(path, complete_checkpoints(path))
    inside = sorted(p.name + "/" for p in path.glob("*") if p.name.startswith(("adapters-", "train-")))
    if inside:  # a run folder
        raise MlasLoraError(f"{path}: {EXPECTED}; it holds {', '.join(inside)}: pass one of them")
    pairs = sorted(p.parent.name for p in path.glob(f"*/{PEFT_CONFIG}"))
    if pairs and pair not in pairs:
        raise MlasLoraError(
            f"{path}: no adapter for {pair} (it holds {', '.join(pairs)}); pass one as --pair"
        )
    if not pairs:
        raise MlasLoraError(f"{path}: {EXPECTED}")
    return "peft", _peft_folder(path / pair, pair)


def _checkpoint_adapters(path: Path, checkpoints: list[Path]) -> tuple[str, Path]:
    if not checkpoints:
        raise MlasLoraError(f"{path}: a training folder without a complete checkpoint yet; {EXPECTED}")
    adapters = checkpoints[-1] / "adapters"
    if (adapters / MANIFEST).is_file():
        return "routed", adapters
    if (adapters / PEFT_CONFIG).is_file():
        return "peft", _peft_folder(adapters, None)
    raise MlasLoraError(
        f"{path}: its checkpoint {adapters} is in its method's own format, neither routed MLAS-LoRA nor "
        "PEFT; translate with the run's export (adapters-<system>/) if PEFT can load it"
    )


def _peft_folder(folder: Path, pair: str | None) -> Path:
    """`folder`, once it holds PEFT's weights file and is not the folder of another pair than `pair`
    in an export of several (a mix-up that would translate with the wrong direction's LoRA)."""
    if not (folder / PEFT_WEIGHTS).is_file():
        raise MlasLoraError(f"{folder}: {PEFT_CONFIG} without {PEFT_WEIGHTS}; {EXPECTED}")
    if pair is not None and folder.name != pair and (folder.parent / pair / PEFT_CONFIG).is_file():
        raise MlasLoraError(
            f"{folder}: the adapter of {folder.name}, not of {pair}: use {folder.parent / pair}"
        )
    return folder


def load_adapters(model, kind: str, folder: Path, check_base: bool = True) -> tuple[object, Callable | None]:
    """The adapters `find_adapters` found put on `model`, in eval mode: (model, the `batch_context`
    that `translation.translate` takes: the routing of a routed model, None for PEFT)."""
    if kind == "routed":
        return load_routed_for_inference(model, folder, check_base=check_base)
    return load_peft(model, folder, check_base=check_base), None


def load_peft(model, folder: Path, check_base: bool = True):
    """PEFT's `PeftModel.from_pretrained` on `model`, after checking that the adapter names it as its
    base (unless `check_base` is False), and checking after that a LoRA got every tensor it expects:
    PEFT skips a missing one silently, leaving that LoRA untrained."""
    from peft import PeftConfig, PeftModel
    from safetensors import SafetensorError

    config_path = folder / PEFT_CONFIG
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 - PEFT raises many kinds for a bad config
        raise MlasLoraError(
            f"{config_path}: PEFT cannot read it ({type(err).__name__}: {_first(err)})"
        ) from None
    if check_base:
        _check_peft_base(config.base_model_name_or_path, model, config_path)
    try:
        peft = PeftModel.from_pretrained(model, str(folder), config=config)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as err:
        raise MlasLoraError(
            f"{folder}: PEFT cannot put this adapter on the model ({type(err).__name__}: {_first(err)}); "
            "was it trained on another architecture?"
        ) from None
    if config.peft_type == "LORA":
        _check_lora_tensors(peft, folder / PEFT_WEIGHTS)
    return peft.eval()


def _first(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _check_peft_base(recorded: str | None, model, where: Path) -> None:
    """The adapter's `base_model_name_or_path` against the model's, both as `base_model_id` names them
    (an embedded model's hub id, a folder's absolute path); nothing to compare when one is unknown."""
    from mlas_lora.models.loading import base_model_id

    actual = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if recorded and actual and base_model_id(recorded) != base_model_id(actual):
        raise MlasLoraError(
            f"{where}: this adapter was trained on {base_model_id(recorded)}, not on {base_model_id(actual)}; "
            "pass that model as --model, or --any-base if both are the same weights"
        )


def _check_lora_tensors(peft, weights: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}
    with safe_open(str(weights), "pt") as handle:
        saved = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise MlasLoraError(
            f"{weights}: does not match its adapter config on this model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; save or export the adapter again"
        )
