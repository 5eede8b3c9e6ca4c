"""Reading and writing the files one stage hands the next, with errors that name the file and the
stage to run: atomic writes (a reader sees the old file or the new one), JSON lines that every reader
splits alike, small JSON files whose damage means "not done", and folders replaced by a swap."""

from __future__ import annotations

import errno
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


def read_small_json(path: Path):
    """A small JSON file a stage wrote (a marker, a count); None when it is missing or unreadable (cut
    by a full disk, empty, not UTF-8): the caller then treats what it records as not done."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


LINE_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
"""Characters `str.splitlines` splits on that `json.dumps(ensure_ascii=False)` leaves raw (U+2028,
U+2029, U+0085): written escaped, so a JSON line stays one line for any reader."""


def json_line(value) -> str:
    """`value` as one line of JSON (UTF-8 text kept, line separators escaped), without the newline."""
    text = json.dumps(value, ensure_ascii=False)
    for char, escaped in LINE_SEPARATORS.items():
        text = text.replace(char, escaped)  # only inside strings: JSON has no other place for them
    return text


def json_lines(text: str) -> list:
    """The values of a JSONL text, split on "\\n" only (`splitlines` would also split on U+2028 and
    others that an older writer left raw inside a string); blank lines are skipped."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def fresh_dir(folder: Path) -> Path:
    """An empty `folder`: whatever was there (an older or half-written stage) is removed first."""
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    return Path(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or a
    resumed run) sees the old file or the new one, never half of one; a failed write leaves no
    temporary file behind."""
    return _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """`data` written atomically, as `write_text_atomic` writes text."""
    return _write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _write_atomic(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    if path.is_dir() or path.name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, "a folder, expected a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is atomic
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:  # a failed write (a full disk) names no file: name the one written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """`data` as indented UTF-8 JSON, written atomically (`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def replace_dir(new: Path, final: Path) -> Path:
    """Put the finished folder `new` in the place of `final` (a folder or nothing): `final` moves aside
    to `.NAME.old`, `new` is renamed to `final`, then the old one is deleted. Until the renames, the
    previous `final` stays whole; `restore_dir` undoes a kill between them."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        final.rename(old)
    Path(new).rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def restore_dir(final: Path) -> None:
    """Put back the folder `replace_dir` moved aside if it was killed before `final` was in place."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.is_dir() and not final.exists():
        old.rename(final)


def read_safetensors(path: Path, fix: str):
    """The tensors of a safetensors file; a missing, truncated or garbled file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise MlasLoraError(f"{path}: missing; {fix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MlasLoraError(f"{path}: truncated or corrupt safetensors file ({err}); {fix}") from None
