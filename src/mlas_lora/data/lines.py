"""Reading UTF-8 text and JSONL files line by line, with errors that name the file and the line.

A file cut off while it was written or copied (a full disk, a killed download) ends in the middle
of its last line; that is reported as such, with what to do (`fix`), not as a mere syntax error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from mlas_lora.errors import MlasLoraError

REWRITE = "write or copy the file again"


def read_lines(path: Path, fix: str = REWRITE) -> Iterator[str]:
    """The file's lines without their line ends (\\n or \\r\\n), read one at a time; a UTF-8 BOM is
    dropped and a line that is not UTF-8 fails naming the file and the line (a last line cut inside
    a character, as a truncated file ends, says so and adds `fix`)."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if not raw.endswith(b"\n"):
                    raise MlasLoraError(
                        f"{path}, line {number}: cut off (the file ends in the middle of a character; "
                        f"was it truncated?): {fix}"
                    ) from None
                raise MlasLoraError(f"{path}:{number}: not valid UTF-8 (save the file as UTF-8)") from None
            yield (line.removeprefix("\ufeff") if number == 1 else line).rstrip("\r\n")


def _ends_unterminated_at(path: Path, lineno: int) -> bool:
    """Whether line `lineno` is the last line of the file and has no line end (a truncated file)."""
    with path.open("rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return False
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return False
    return count_lines(path) == lineno


def jsonl_rows(path: Path, fix: str = REWRITE) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file, read one at a time.

    A line that is not JSON names the file and the line; a last line cut off in the middle of an
    object (a file truncated while written or copied) is reported as such, with `fix`.
    """
    for lineno, line in enumerate(read_lines(path, fix), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if _ends_unterminated_at(path, lineno):
                raise MlasLoraError(
                    f"{path}, line {lineno}: cut off (the file ends in the middle of a JSON object; "
                    f"was it truncated?): {fix}"
                ) from None
            raise MlasLoraError(f"{path}, line {lineno}: not valid JSON ({err.msg})") from None
        yield lineno, row


def count_lines(path: Path) -> int:
    """Lines in the file (a last line without a line end counts), read as bytes."""
    with path.open("rb") as file:
        return sum(1 for _ in file)
