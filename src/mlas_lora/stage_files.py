"""Reading the files one stage hands the next, with errors that name the file and the stage to run."""

from __future__ import annotations

import json
import os
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


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or a
    resumed run) sees the old file or the new one, never half of one; a failed write leaves no
    temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is atomic
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """`data` as indented UTF-8 JSON, written atomically (`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
