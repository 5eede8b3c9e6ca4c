"""Property-based input fuzzing (Hypothesis) of the readers, the hypothesis files and `evaluate`: random
Unicode with line separators (U+2028, U+2029, U+0085, CR), random bytes, random TSV shapes. Each input
gives a clean result or one `MlasLoraError` line; never another exception, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # the dev extra; the rest of the suite does not need it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mlas_lora.data.readers import fill_template, read_jsonl, read_segments, read_tsv  # noqa: E402
from mlas_lora.errors import MlasLoraError  # noqa: E402
from mlas_lora.stage_files import json_line, json_lines  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEPARATORS = "\u2028\u2029\x85\r\t\n \ufeff"
TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(SEPARATORS), max_size=40)
"""Any UTF-8 text, with line separators, tabs, CRs and BOMs drawn often."""


@contextlib.contextmanager
def folder():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def clean_or_one_line(read):
    """`read()`'s result, or None where it raised a one-line MlasLoraError (anything else fails)."""
    try:
        return read()
    except MlasLoraError as err:
        assert "\n" not in str(err) and "Traceback" not in str(err)
        return None


@FUZZ
@given(st.binary(max_size=200))
def test_read_segments_of_any_bytes(data):
    with folder() as root:
        (root / "f.txt").write_bytes(data)
        lines = clean_or_one_line(lambda: read_segments(root / "f.txt"))
    if lines is not None:  # split on "\n" only: U+2028 and friends stay inside a segment
        assert len(lines) == data.count(b"\n") + (not data.endswith(b"\n"))


@FUZZ
@given(st.lists(st.lists(TEXT, min_size=0, max_size=4), max_size=6))
def test_read_tsv_of_any_shape(rows):
    text = "\n".join("\t".join(fields) for fields in rows)
    with folder() as root:
        (root / "d.tsv").write_text(text, encoding="utf-8")
        examples = clean_or_one_line(lambda: list(read_tsv(root / "d.tsv", "en-de")))
    for example in examples or ():
        assert example.source.strip() and example.reference.strip() and "\n" not in example.source


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=30).map(lambda b: b.decode("utf-8", "replace")),
                          st.dictionaries(TEXT, TEXT, max_size=2).map(json.dumps),
                          st.fixed_dictionaries({"translation": st.dictionaries(
                              st.sampled_from(["en", "de", "fi"]), TEXT | st.integers() | st.none(),
                              max_size=3)}).map(
                              lambda r: json.dumps(r, ensure_ascii=False))), max_size=5))  # fmt: skip
def test_read_jsonl_of_any_rows(lines):
    with folder() as root:
        (root / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
        examples = clean_or_one_line(lambda: list(read_jsonl(root / "d.jsonl", "en-de")))
    for example in examples or ():
        assert example.source and example.reference


@FUZZ
@given(st.lists(st.fixed_dictionaries({"source": TEXT, "reference": TEXT, "hypothesis": TEXT}), max_size=5))
def test_hypothesis_rows_survive_any_text(rows):
    from mlas_lora.experiments.run import HypothesisStore

    with folder() as root:
        path = root / "hyps.jsonl"
        HypothesisStore._write(path, [{"key": "k"}, *rows])
        raw = path.read_text(encoding="utf-8")
        assert HypothesisStore._rows(path) == [{"key": "k"}, *rows]
    assert len(raw.splitlines()) == len(rows) + 1  # one line per row for any reader
    assert json_lines("".join(json_line(r) + "\n" for r in rows)) == rows


@FUZZ
@given(TEXT)
def test_corpus_templates_fill_or_refuse(template):
    filled = clean_or_one_line(lambda: fill_template(template, src="en", tgt="de", xx="de", split="test"))
    if filled is not None:
        assert filled == template.format(src="en", tgt="de", xx="de", split="test")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TEXT, min_size=1, max_size=4), st.lists(TEXT, min_size=1, max_size=4), st.booleans())
def test_evaluate_scores_or_says_why_in_one_line(hyps, refs, as_bytes):
    from mlas_lora.cli import main

    out, err = io.StringIO(), io.StringIO()
    with folder() as root, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        (root / "h").write_text("\n".join(hyps), encoding="utf-8")
        (root / "r").write_bytes("\n".join(refs).encode("utf-8") if as_bytes else b"\xff" + refs[0].encode())
        code = main(["evaluate", "--hyp", str(root / "h"), "--ref", str(root / "r"), "--lang", "de",
                     "--metrics", "bleu,chrf", "--json", str(root / "out.json")])  # fmt: skip
        written = (root / "out.json").is_file()
    assert code in (0, 2) and "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("mlas-lora: error: ") and err.getvalue().count("\n") == 1
        assert not written
    else:
        assert written and "chrF++" in out.getvalue()
