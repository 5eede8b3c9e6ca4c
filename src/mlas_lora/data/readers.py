"""Readers that stream parallel-data files as `Example`s of one translation direction.

Formats: TSV (`source<TAB>reference`), JSONL in the Hugging Face translation layout
(`{"translation": {"en": ..., "de": ...}}`), aligned plain text (`name.en` + `name.de`, one
segment per line), Hugging Face `datasets` (optional extra), and the embedded corpus. Every
problem a user can fix is a `MlasLoraError` naming the file and line.

Each reader returns an iterator that reads a line when the next example is asked for, so a
WMT18 training set (millions of rows per direction) never sits in a Python list; take a sample
with `data.sampling`. What can be checked before reading (the file exists, aligned files have the
same number of lines, the dataset loads) raises at the call; a bad line raises when it is reached,
and a source without a single example raises at its end.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlas_lora.data.lines import count_lines, jsonl_rows, read_lines
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.languages import Direction, iso639_3

# FLORES-200 column suffixes (`sentence_deu_Latn`) of the paper's languages; another language's is
# found by its ISO 639-3 code (`flores_column`).
FLORES_CODES = {
    "cs": "ces_Latn",
    "de": "deu_Latn",
    "en": "eng_Latn",
    "et": "est_Latn",
    "fi": "fin_Latn",
    "ru": "rus_Cyrl",
    "tr": "tur_Latn",
    "zh": "zho_Hans",
}


def _direction(direction: str | Direction) -> Direction:
    return direction if isinstance(direction, Direction) else Direction.parse(direction)


def _existing(path: str | Path, role: str = "parallel data") -> Path:
    path = Path(path)
    if path.is_dir():
        raise MlasLoraError(f"{role} file {path} is a directory, expected a file")
    if not path.is_file():
        raise MlasLoraError(f"{role} file {path} does not exist")
    return path


def read_segments(path: str | Path, role: str = "input") -> list[str]:
    """The segments of a one-segment-per-line UTF-8 file (empty lines kept: an empty segment)."""
    lines = list(read_lines(_existing(path, role)))
    if not lines:
        raise MlasLoraError(f"{role} file {path} is empty: expected one segment per line")
    return lines


def _nonempty(examples: Iterable[Example], where: str) -> Iterator[Example]:
    empty = True
    for example in examples:
        empty = False
        yield example
    if empty:
        raise MlasLoraError(f"{where} holds no examples")


def read_tsv(path: str | Path, direction: str | Direction) -> Iterator[Example]:
    """One `source<TAB>reference` pair per line; blank lines are skipped."""
    d, path = _direction(direction), _existing(path)
    return _nonempty(_tsv_examples(path, d), str(path))


def _tsv_examples(path: Path, d: Direction) -> Iterator[Example]:
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise MlasLoraError(
                f"{path}, line {lineno}: expected 'source<TAB>reference' (2 non-empty tab-separated "
                f"fields), found {len(fields)} field(s): {line[:60]!r}"
            )
        yield Example(d.src, d.tgt, fields[0].strip(), fields[1].strip())


def read_jsonl(path: str | Path, direction: str | Direction) -> Iterator[Example]:
    """One `{"translation": {src: ..., tgt: ...}}` object per line; blank lines are skipped."""
    d, path = _direction(direction), _existing(path)
    return _nonempty(_jsonl_examples(path, d), str(path))


def _jsonl_examples(path: Path, d: Direction) -> Iterator[Example]:
    for lineno, row in jsonl_rows(path):
        pair = row.get("translation") if isinstance(row, dict) else None
        missing = [x for x in (d.src, d.tgt) if not isinstance(pair, dict) or not _text(pair.get(x))]
        if missing:
            raise MlasLoraError(
                f'{path}, line {lineno}: expected {{"translation": {{"{d.src}": ..., "{d.tgt}": ...}}}}, '
                f"missing or empty language key(s) {missing} (each must be text, not only spaces)"
            )
        yield Example(d.src, d.tgt, pair[d.src].strip(), pair[d.tgt].strip())


def _text(value) -> bool:
    """Whether a row's field is a segment: a string with more than whitespace (as a TSV field must be)."""
    return isinstance(value, str) and bool(value.strip())


def aligned_paths(prefix_or_src_path: str | Path, direction: str | Direction) -> tuple[Path, Path]:
    """`(prefix.src, prefix.tgt)` from a prefix (`data/test`) or the source file (`data/test.de`)."""
    d = _direction(direction)
    path = Path(prefix_or_src_path)
    prefix = path.with_suffix("") if path.suffix == f".{d.src}" else path
    return Path(f"{prefix}.{d.src}"), Path(f"{prefix}.{d.tgt}")


def read_aligned(prefix_or_src_path: str | Path, direction: str | Direction) -> Iterator[Example]:
    """Line i of `prefix.src` is translated by line i of `prefix.tgt`.

    The line counts are compared before the first example (one streaming pass over each file), so
    a misaligned pair of files is an error even when only a sample of it is read.
    """
    d = _direction(direction)
    src_path, tgt_path = (_existing(p) for p in aligned_paths(prefix_or_src_path, d))
    n_src, n_tgt = count_lines(src_path), count_lines(tgt_path)
    if n_src != n_tgt:
        raise MlasLoraError(
            f"aligned files differ in length: {src_path} has {n_src} lines, {tgt_path} has {n_tgt} lines"
        )
    return _nonempty(_aligned_examples(src_path, tgt_path, d), f"{src_path} / {tgt_path}")


def _aligned_examples(src_path: Path, tgt_path: Path, d: Direction) -> Iterator[Example]:
    pairs = zip(read_lines(src_path), read_lines(tgt_path), strict=True)
    for lineno, (s, r) in enumerate(pairs, start=1):
        if bool(s.strip()) != bool(r.strip()):
            raise MlasLoraError(
                f"{src_path} / {tgt_path}, line {lineno}: one side is empty, the other is not"
            )
        if s.strip():
            yield Example(d.src, d.tgt, s.strip(), r.strip())


def read_hf(name: str, config: str | None, split: str, direction: str | Direction) -> Iterator[Example]:
    """Rows of a Hugging Face dataset: the `translation` layout (WMT) or FLORES `sentence_<code>` columns.

    The dataset is loaded (downloaded, or memory-mapped from the cache) at the call; rows become
    examples one at a time as they are read.

    `datasets` is an optional extra; without it, or when the dataset cannot be reached (offline,
    wrong name/config/split), the error says so and how to proceed instead of a stack trace.
    """
    d = _direction(direction)
    where = f"Hugging Face dataset {name!r} (config {config!r}, split {split!r})"
    try:
        import datasets
    except ImportError:
        raise MlasLoraError(
            f"reading {where} needs the optional `datasets` package: pip install 'mlas-lora[hf]', "
            "or export the data to a .tsv / .jsonl file"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network, auth, unknown name/config/split: all fixable by the user
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise MlasLoraError(
            f"cannot load {where}: {type(err).__name__}: {reason}. Offline? Use a cached copy "
            "(HF_DATASETS_OFFLINE=1) or export the data to a .tsv / .jsonl file"
        ) from None
    return _nonempty((_hf_example(row, i, d, where) for i, row in enumerate(rows)), where)


def _hf_example(row: dict, index: int, d: Direction, where: str) -> Example:
    pair = row.get("translation") or {x: row.get(flores_column(x, row)) for x in (d.src, d.tgt)}
    missing = [x for x in (d.src, d.tgt) if not _text(pair.get(x))]
    if missing:
        raise MlasLoraError(f"{where}, row {index}: no text for {missing} (columns: {sorted(row)})")
    return Example(d.src, d.tgt, pair[d.src].strip(), pair[d.tgt].strip())


def flores_column(lang: str, columns) -> str:
    """A language's FLORES-200 column: `sentence_<FLORES_CODES>`, else the one column of its ISO 639-3
    code in any script (`fr` -> `sentence_fra_Latn`), else `sentence_<lang>`."""
    if lang in FLORES_CODES:
        return f"sentence_{FLORES_CODES[lang]}"
    prefix = f"sentence_{iso639_3(lang)}_"
    found = [c for c in columns if c.startswith(prefix)]
    return found[0] if len(found) == 1 else f"sentence_{lang}"


TEMPLATE_FIELDS = ("src", "tgt", "xx", "split")
"""The fields a corpus spec template may name (`data.corpus: hf:wmt18:{xx}-en:{split}`)."""


def template_problem(template: str) -> str | None:
    """Why `template` cannot be filled, or None: only TEMPLATE_FIELDS by name, without conversion or
    format spec (no attribute or index lookups: `{src.__class__}` is refused, not evaluated)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        return f"{template!r}: {err} (a literal brace is written {{{{ or }}}})"
    bad = [
        "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        for _, field, spec, conversion in parsed
        if field is not None and (field not in TEMPLATE_FIELDS or spec or conversion)
    ]
    if bad:
        known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        return f"{template!r}: unknown field(s) {', '.join(bad)} (known: {known})"
    return None


def fill_template(template: str, **values: str) -> str:
    """`template` with its fields replaced by `values`, as `str.format` would for a valid template."""
    if problem := template_problem(template):
        raise MlasLoraError(f"corpus template {problem}")
    parsed = string.Formatter().parse(template)
    return "".join(text + (values[field] if field is not None else "") for text, field, _, _ in parsed)


def read_examples(spec: str | Path, direction: str | Direction) -> Iterator[Example]:
    """Examples from a config's data spec, chosen by its form, as a stream.

    - `path.tsv` or `path.jsonl`: by suffix;
    - `prefix` or `prefix.<src>` with `prefix.<src>` and `prefix.<tgt>` beside it: aligned text;
    - `hf:NAME:CONFIG:SPLIT` (CONFIG may be empty): Hugging Face datasets;
    - `embedded:SPLIT` (train, dev, test, ood): the embedded corpus.
    """
    d = _direction(direction)
    text = str(spec)
    if text.startswith("hf:"):
        parts = text.split(":")
        if len(parts) != 4:
            raise MlasLoraError(
                f"bad data spec {text!r}: expected hf:NAME:CONFIG:SPLIT, e.g. hf:wmt18:de-en:test"
            )
        return read_hf(parts[1], parts[2] or None, parts[3], d)
    if text.startswith("embedded:"):
        from mlas_lora.data.embedded import load_embedded  # the corpus module is heavier; load on use

        return _nonempty(iter(load_embedded(d, text.split(":", 1)[1])), text)
    path = Path(text)
    if path.suffix == ".tsv":
        return read_tsv(path, d)
    if path.suffix == ".jsonl":
        return read_jsonl(path, d)
    src_path, tgt_path = aligned_paths(path, d)
    if src_path.is_file() or tgt_path.is_file():
        return read_aligned(path, d)
    raise MlasLoraError(
        f"cannot read data spec {text!r}: expected a .tsv or .jsonl file, an aligned prefix with "
        f"{src_path.name} and {tgt_path.name}, hf:NAME:CONFIG:SPLIT, or embedded:SPLIT"
    )
