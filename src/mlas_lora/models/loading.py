"""Load a causal LM and its tokenizer: an embedded model by name, a local checkpoint, or a hub id.

The architecture is checked (`mlas_lora.models.arch.describe`) after reading the config and before
reading any weights, so an unsupported model fails fast with a clear message.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import ArchInfo, describe
from mlas_lora.models.registry import REGISTRY, prepared_dir, require_prepared

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); Linux only, else False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for a name; "auto" is bfloat16 where the hardware runs it fast, else float32.

    On CPUs with native bfloat16 (AVX512-BF16/AMX) it is about 2x faster than float32 and halves memory.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise MlasLoraError(f"unknown dtype {dtype!r}; expected one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def key_dtype(dtype: str) -> str:
    """`models.dtype` as stage, training and hypothesis keys record it: 'auto' names what it resolves
    to on this machine where that is not bfloat16 ('auto:float32' on a CPU without native bfloat16),
    since a float32 run computes another function than a bfloat16 one and a cell carried between
    machines (`cells:`) must not pass for the other; where it resolves to bfloat16 it stays 'auto', so
    the keys of the runs made before on bfloat16 CPUs stay valid."""
    if dtype != "auto":
        return dtype
    from mlas_lora.distributed import compute_device

    resolved = str(resolve_dtype("auto", compute_device())).removeprefix("torch.")
    return "auto" if resolved == "bfloat16" else f"auto:{resolved}"


def resolve_source(name_or_path: str | Path) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local) for a registry name, directory or hub id."""
    text = str(name_or_path)
    if text in REGISTRY:
        return str(require_prepared(text)), True
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path), True
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing local path.
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        missing = "" if path.exists() else ": not found"
        raise MlasLoraError(
            f"model path {text!r} is not a checkpoint directory{missing} "
            f"(expected a folder with config.json, or one of: {', '.join(REGISTRY)}, or a hub id)"
        )
    return text, False


def base_model_id(name_or_path: str | Path) -> str:
    """What adapters record as their base model: an embedded model's hub id (given by name or by its
    prepared folder), a local folder's absolute path, else the hub id as given ("" for a model built
    in memory). Recording the hub id, not the cache path, lets others load the adapters."""
    text = str(name_or_path)
    if text in REGISTRY:
        return REGISTRY[text].hub_id
    path = Path(text).expanduser()
    if not text or not path.is_dir():
        return text
    path = path.resolve()
    return next((s.hub_id for s in REGISTRY.values() if prepared_dir(s.name).resolve() == path), str(path))


def load_model_config(source: str, local: bool):
    """The Hugging Face config of a model (as `resolve_source` resolves it), without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        where = "local checkpoint" if local else "Hugging Face hub id (is the network reachable?)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MlasLoraError(f"cannot load the config of {source!r} as a {where}: {first}") from None


def model_arch(name_or_path: str | Path) -> ArchInfo:
    """The architecture of a model read from its config alone, no weights: what every command checks
    before its first stage. Raises, naming the model, where the config does not open (a wrong path,
    an embedded model not prepared, a hub id not reachable) or the architecture is not supported."""
    config = load_model_config(*resolve_source(name_or_path))
    try:
        return describe(config)
    except MlasLoraError as err:
        raise MlasLoraError(f"{str(name_or_path)!r}: {err}") from None


def load_tokenizer(source: str, local: bool = True):
    """Tokenizer padded on the left (generation appends on the right); pad = eos if it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise MlasLoraError(f"cannot load the tokenizer of {source!r}: {err}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise MlasLoraError(f"tokenizer of {source!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def damaged_safetensors(folder: Path) -> tuple[Path, str] | None:
    """The first safetensors file in `folder` whose header does not read (truncated, empty, garbled)."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            return path, str(err)
    return None


def weights_error(name: str, source: str, local: bool, err: Exception) -> MlasLoraError:
    """The error for weights that do not load: a damaged file is named, with how to get it again."""
    damaged = damaged_safetensors(Path(source)) if local else None
    if damaged is None and isinstance(err, pickle.UnpicklingError):
        return MlasLoraError(
            f"{source}: its weights are a pickle (*.bin) that holds more than tensors; it is not loaded, "
            "since a pickle can run code: save the model as safetensors where you trust the file"
        )
    if damaged is None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return MlasLoraError(f"cannot load the weights of {source!r}: {first}")
    path, reason = damaged
    fix = (
        f"run `mlas-lora models prepare {name} --force` to convert the model again"
        if name in REGISTRY
        else "save or copy the checkpoint again"
    )
    return MlasLoraError(f"{path}: truncated or corrupt safetensors file ({reason}); {fix}")


def load_model(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "auto",
    device="auto",
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
):
    """(model in eval mode, tokenizer) for an embedded model name, a local checkpoint or a hub id.

    `max_memory` ({0: "20GiB", "cpu": "60GiB"}: per GPU index, "cpu") places a model larger than one
    device with `device_map="auto"`: layers fill the GPUs in order, then CPU memory, then
    `offload_folder` on disk; offloaded layers run on the first GPU (or the CPU) with their weights
    loaded for each forward. `device` is then ignored. Awareness scoring runs on such a model as on
    a resident one (`awareness.offload`). `device` "auto" is `distributed.compute_device()`: the
    launcher's device, else the first visible GPU, else the CPU.
    """
    from transformers import AutoModelForCausalLM

    from mlas_lora.distributed import compute_device
    from mlas_lora.progress import follow_transformers_bars

    follow_transformers_bars()
    if device == "auto":
        device = compute_device()

    source, local = resolve_source(name_or_path)
    config = load_model_config(source, local)
    describe(config)  # unsupported architectures fail here, before any weights are read
    torch_dtype = resolve_dtype(dtype, device)
    placed = {}
    if max_memory is not None:
        placed = dict(device_map="auto", max_memory=max_memory, offload_folder=offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local, **placed
        )
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise weights_error(str(name_or_path), source, local, err) from None
    if device is not None and not placed:
        model = model.to(device)
    tokenizer = load_tokenizer(source, local)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
