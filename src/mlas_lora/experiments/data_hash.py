"""The content hash of the corpus rows a stage read, kept beside its key (issue 25).

Stage and hypothesis keys hash the config, which names the corpus files but not their text: a corpus
rewritten in place keeps every key. So each stage that reads rows records `data`, a sha256 over
exactly those rows (`rows_digest`, over the rows already loaded: nothing is read twice):

    awareness-, classes-, transfer-<key>/stage.json   the seed sentences (`seed_data`: the dev split)
    train-<system>/key.json, stage.json               the training split, with the seed sentences when
                                                      the method starts from the teacher's factors, and
                                                      the prior training's rows (pipeline.training_data)
    hyps/<system>/*.jsonl, first line                 what the system's training or prompt read

A stage of its key made from other rows is stale, and one line on stderr says so (`say_changed`): a
teacher stage is made again in place (stages.stage_ready), a training is set aside as
`train-NAME@KEY8.data-DATA8` (pipeline.set_aside_stale_training; `same_training` finds it again if
those rows come back), hypotheses are translated again. Keys stay as they were, so older run folders
stay valid: a marker without `data` is adopted, the hash written on its first reuse (`same_data`, as
`HypothesisStore.load` adopts its `content` key); `pipeline.check_stages` adopts a system's whole
chain before its cached hypotheses are read, so a later edit is noticed behind them too. A stage of an
older version first reused after an edit cannot be told apart from a current one, and is adopted.

`distill-<key>/` needs none of this: its key hashes the sources it translates.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from mlas_lora.data.records import Example
from mlas_lora.distributed import is_main_process
from mlas_lora.stage_files import read_small_json, write_json_atomic


def rows_digest(rows: dict[str, list[Example]]) -> str:
    """sha256 over every row's (src, tgt, source, reference), direction by direction, in order; each
    field length-prefixed, so no two corpora share a digest by a moved tab or line break."""
    digest = hashlib.sha256()
    for direction, examples in rows.items():
        _update(digest, direction, str(len(examples)))
        for e in examples:
            _update(digest, e.src_lang, e.tgt_lang, e.source, e.reference)
    return digest.hexdigest()


def segments_digest(pairs) -> str:
    """sha256 over (source, reference) pairs in order, length-prefixed as `rows_digest`: what an
    archived hypothesis cell was made from (cells.py), kept without the text."""
    pairs = list(pairs)
    digest = hashlib.sha256()
    _update(digest, str(len(pairs)))
    for source, reference in pairs:
        _update(digest, source, reference)
    return digest.hexdigest()


def _update(digest, *fields: str) -> None:
    for field in fields:
        raw = field.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little") + raw)


def combine_digests(parts: dict) -> str:
    """One digest of several (`{"train": ..., "seeds": ...}`), for a stage that read several splits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def seed_data(splits) -> str:
    """The rows the awareness stage scores, from which the classes and transfer stages derive."""
    return rows_digest(splits.dev)


def same_data(marker: Path, data: str) -> bool:
    """Whether the marker of a stage whose key matched records `data`. One without (an older version's)
    is adopted: `data` is written into it and it counts as the same."""
    recorded = read_small_json(marker)
    if not isinstance(recorded, dict):
        return True  # unreadable: the key check already calls it not done
    if recorded.get("data") is None:
        if is_main_process():
            write_json_atomic(marker, {**recorded, "data": data})
        return True
    return recorded["data"] == data


def say_changed(folder: Path, action: str) -> None:
    if is_main_process():
        print(
            f"{folder}: the corpus rows it read changed since it was made (a file edited in place keeps "
            f"the key): {action}",
            file=sys.stderr,
        )


def stale_name(name: str, key: str, data: str) -> str:
    """`NAME@KEY8.data-DATA8`: where a training of this key made from other rows is set aside."""
    return f"{name}@{key[:8]}.data-{data[:8]}"


def recorded_data(marker: Path) -> str | None:
    """The `data` a stage's marker records; None when it records none (an older version's) or is
    unreadable."""
    recorded = read_small_json(marker)
    return recorded.get("data") if isinstance(recorded, dict) else None
