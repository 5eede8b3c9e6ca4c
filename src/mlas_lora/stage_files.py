"""Reading the files one stage hands the next, with errors that name the file and the stage to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlas_lora.errors import MlasLoraError


def require_file(path: Path, stage: str) -> Path:
    if not Path(path).is_file():
        raise MlasLoraError(f"missing {path} (run the {stage} stage first)")
    return Path(path)


def read_json(path: Path, stage: str) -> dict:
    """A stage's JSON file; missing or invalid JSON is a clear error with file and line."""
    require_file(path, stage)
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise MlasLoraError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def fresh_dir(folder: Path) -> Path:
    """An empty `folder`: whatever was there (an older or half-written stage) is removed first."""
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    return Path(folder)
