"""Finished hypothesis cells carried between machines without corpus text: `mlas-lora cells export`.

A run's cell (`RUN/hyps/SYSTEM/SPLIT.DIRECTION.jsonl`: a header, then per segment its source,
reference and hypothesis) holds corpus text, which is not this repository's to commit. An experiment
of several sessions, each on a fresh clone, keeps its finished cells in an archive instead:

    DIR/SYSTEM/SPLIT.DIRECTION.json.gz   {"format", "header": {key, seconds, content?, copied_from?,
                                          data?}, "segments": N, "segments_sha256", "hypotheses": [...]}

The header is the run file's (keys and hashes only), `segments_sha256` the digest of its ordered
(source, reference) pairs (`data_hash.segments_digest`). A config's `cells: DIR` names the archive:
`HypothesisStore.load` (run.py) takes a cell the run folder lacks from there when its key (or content
key) and rows' hash match as for a run file, and the segments to translate have the stored digest,
then writes the full run file, sources and references read from the corpus. A cell whose segments
changed, or whose file is cut or garbled, is translated again. Files are gzip without a timestamp:
the same cell exported again is the same bytes, and git sees no change.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.data_hash import segments_digest
from mlas_lora.stage_files import json_line, json_lines, write_bytes_atomic

FORMAT = "mlas-lora-cell/1"
SUFFIX = ".json.gz"
SET_ASIDE = re.compile(r"@[0-9a-f]{8}$")
"""A folder `stages.set_aside_name` names (`NAME@KEY8`): another key's cells, not exported."""


def hypothesis_rows(path: Path) -> list[dict]:
    """The header and rows of a run's hypothesis file; [] when there is none or it is unreadable (cut
    by a kill or a full disk): its cells are then translated again."""
    try:
        rows = json_lines(path.read_text(encoding="utf-8")) if path.is_file() else []
    except (UnicodeDecodeError, json.JSONDecodeError):
        return []
    return rows if all(isinstance(row, dict) for row in rows) else []


def archived(archive: Path, system: str, split: str, direction: str) -> Path:
    return archive / system / f"{split}.{direction}{SUFFIX}"


def cell_bytes(rows: list[dict]) -> bytes | None:
    """A run file's rows as an archived cell (gzip, no timestamp); None when a row lacks its texts."""
    fields = ("source", "reference", "hypothesis")
    segments = rows[1:]
    if not rows or not isinstance(rows[0].get("key"), str):
        return None
    if not all(isinstance(r.get(f), str) for r in segments for f in fields):
        return None
    cell = {
        "format": FORMAT,
        "header": rows[0],
        "segments": len(segments),
        "segments_sha256": segments_digest((r["source"], r["reference"]) for r in segments),
        "hypotheses": [r["hypothesis"] for r in segments],
    }
    return gzip.compress((json_line(cell) + "\n").encode("utf-8"), compresslevel=9, mtime=0)


def read_cell(path: Path) -> dict | None:
    """An archived cell; None when it is missing, cut, garbled or of another format."""
    try:
        cell = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(cell, dict) or cell.get("format") != FORMAT:
        return None
    header, hyps = cell.get("header"), cell.get("hypotheses")
    well_formed = (
        isinstance(header, dict)
        and isinstance(header.get("key"), str)
        and isinstance(header.get("seconds", 0), (int, float))
        and isinstance(hyps, list)
        and all(isinstance(h, str) for h in hyps)
        and cell.get("segments") == len(hyps)
        and isinstance(cell.get("segments_sha256"), str)
    )
    return cell if well_formed else None


def made_from(cell: dict, examples, data: str | None) -> bool:
    """Whether an archived cell was made from exactly these segments and (given `data`) from the rows
    it hashes (a header without the hash, an older version's, counts as made from them)."""
    return (
        cell["segments"] == len(examples)
        and cell["segments_sha256"] == segments_digest((e.source, e.reference) for e in examples)
        and (data is None or cell["header"].get("data") in (None, data))
    )


def find_cell(
    archive: Path, system: str, split: str, direction: str, key: str, examples, data
) -> dict | None:
    """The system's archived cell made under `key` from `examples` (and the rows `data` hashes)."""
    cell = read_cell(archived(archive, system, split, direction))
    ok = cell is not None and cell["header"]["key"] == key and made_from(cell, examples, data)
    return cell if ok else None


def find_by_content(
    archive: Path, split: str, direction: str, content: str, examples, data
) -> tuple[str, dict] | None:
    """(system, cell): another system's archived cell of the same content key, made from `examples`."""
    for path in sorted(archive.glob(f"*/{split}.{direction}{SUFFIX}")):
        cell = read_cell(path)
        if cell is not None and cell["header"].get("content") == content and made_from(cell, examples, data):
            return path.parent.name, cell
    return None


@dataclass
class Exported:
    """What `export_cells` did: cells written, cells whose file held these bytes already, run files
    skipped (unreadable, or a row without its texts), and the bytes of all the archive's cells written
    or unchanged."""

    written: int = 0
    unchanged: int = 0
    unreadable: int = 0
    size: int = 0


def export_cells(run_dir: Path, out: Path) -> Exported:
    """Every cell of `run_dir/hyps/` into `out` as SYSTEM/SPLIT.DIRECTION.json.gz (module docstring);
    folders set aside under another key (`NAME@KEY8`) are left out. A cell whose file holds the same
    bytes is not written again."""
    hyps = Path(run_dir) / "hyps"
    if not hyps.is_dir():
        raise MlasLoraError(f"{hyps}: no hypotheses to export (run an experiment into {run_dir} first)")
    done = Exported()
    for path in sorted(hyps.glob("*/*.jsonl")):
        if SET_ASIDE.search(path.parent.name):
            continue
        data = cell_bytes(hypothesis_rows(path))
        if data is None:
            done.unreadable += 1
            continue
        target = Path(out) / path.parent.name / (path.name.removesuffix(".jsonl") + SUFFIX)
        if target.is_file() and target.read_bytes() == data:
            done.unchanged += 1
        else:
            write_bytes_atomic(target, data)
            done.written += 1
        done.size += len(data)
    return done
