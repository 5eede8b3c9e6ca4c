"""Where the project keeps its cache: `$MLAS_LORA_HOME`, default `~/.cache/mlas-lora`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """The project cache root (corpus, converted models, WordNet)."""
    return Path(os.environ.get("MLAS_LORA_HOME", Path.home() / ".cache" / "mlas-lora")).expanduser()


def corpus_dir() -> Path:
    return cache_home() / "corpus"


def models_dir() -> Path:
    return cache_home() / "models"


def downloads_dir() -> Path:
    return cache_home() / "downloads"
