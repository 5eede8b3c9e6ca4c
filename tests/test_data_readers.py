"""Parallel-data readers: every format's happy path and every user-fixable error."""

from __future__ import annotations

import builtins
import itertools
import json
import sys
import types
from collections.abc import Iterator

import pytest

from mlas_lora.data.readers import read_aligned, read_examples, read_hf, read_jsonl, read_tsv
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_reads_pairs_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "d.tsv", "Hello world\tHallo Welt\n\n Good day \tGuten Tag\n")
    assert list(read_tsv(path, "en-de")) == [
        Example("en", "de", "Hello world", "Hallo Welt"),
        Example("en", "de", "Good day", "Guten Tag"),
    ]


def test_tsv_line_without_tab_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.tsv", "a\tb\nno tab here\n")
    with pytest.raises(MlasLoraError, match=r"d\.tsv, line 2: expected 'source<TAB>reference'.*1 field"):
        list(read_tsv(path, "en-de"))


def test_tsv_extra_column_and_empty_field_are_errors(tmp_path):
    with pytest.raises(MlasLoraError, match="line 1:.*3 field"):
        list(read_tsv(write(tmp_path / "a.tsv", "a\tb\tc\n"), "en-de"))
    with pytest.raises(MlasLoraError, match="line 1:"):
        list(read_tsv(write(tmp_path / "b.tsv", "a\t \n"), "en-de"))


def test_jsonl_hf_translation_layout(tmp_path):
    rows = [
        {"translation": {"en": "One cat", "de": "Eine Katze", "fr": "x"}},
        {"translation": {"en": "Two", "de": "Zwei"}},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(read_jsonl(path, "de-en")) == [
        Example("de", "en", "Eine Katze", "One cat"),
        Example("de", "en", "Zwei", "Two"),
    ]


def test_jsonl_bad_json_names_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"translation": {"en": "a", "de": "b"}}\n{oops\n')
    with pytest.raises(MlasLoraError, match=r"d\.jsonl, line 2: not valid JSON"):
        list(read_jsonl(path, "en-de"))


def test_jsonl_missing_language_key_names_line_and_key(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"translation": {"en": "a", "fr": "b"}}\n')
    with pytest.raises(MlasLoraError, match=r"line 1: .*missing or empty language key\(s\) \['de'\]"):
        list(read_jsonl(path, "en-de"))
    path = write(tmp_path / "e.jsonl", '["not", "an", "object"]\n')
    with pytest.raises(MlasLoraError, match=r"line 1: .*\['en', 'de'\]"):
        list(read_jsonl(path, "en-de"))


def test_aligned_from_prefix_and_from_source_file(tmp_path):
    write(tmp_path / "t.en", "Open the file\nClose it\n")
    write(tmp_path / "t.de", "Datei öffnen\nSchließen\n")
    expected = [
        Example("en", "de", "Open the file", "Datei öffnen"),
        Example("en", "de", "Close it", "Schließen"),
    ]
    assert list(read_aligned(tmp_path / "t", "en-de")) == expected
    assert list(read_aligned(tmp_path / "t.en", "en-de")) == expected
    assert list(read_aligned(tmp_path / "t.de", "de-en"))[0] == Example(
        "de", "en", "Datei öffnen", "Open the file"
    )


def test_aligned_length_mismatch_names_both_files_and_counts(tmp_path):
    write(tmp_path / "t.en", "a\nb\nc\n")
    write(tmp_path / "t.de", "x\ny\n")
    with pytest.raises(MlasLoraError, match=r"t\.en has 3 lines, .*t\.de has 2 lines"):
        list(read_aligned(tmp_path / "t", "en-de"))


def test_aligned_missing_file(tmp_path):
    write(tmp_path / "t.en", "a\n")
    with pytest.raises(MlasLoraError, match=r"t\.de does not exist"):
        list(read_aligned(tmp_path / "t", "en-de"))


def test_read_examples_dispatches_on_form(tmp_path):
    write(tmp_path / "a.tsv", "Hi there\tHallo\n")
    write(tmp_path / "b.jsonl", '{"translation": {"en": "Hi there", "de": "Hallo"}}\n')
    write(tmp_path / "c.en", "Hi there\n")
    write(tmp_path / "c.de", "Hallo\n")
    expected = [Example("en", "de", "Hi there", "Hallo")]
    for spec in ("a.tsv", "b.jsonl", "c", "c.en"):
        assert list(read_examples(tmp_path / spec, "en-de")) == expected
    with pytest.raises(MlasLoraError, match=r"cannot read data spec .*nothing\.en and nothing\.fi"):
        list(read_examples(tmp_path / "nothing", "en-fi"))


def test_empty_corpus_is_an_error(tmp_path):
    for name in ("e.tsv", "e.jsonl"):
        with pytest.raises(MlasLoraError, match="holds no examples"):
            list(read_examples(write(tmp_path / name, "\n\n"), "en-de"))
    write(tmp_path / "e.en", "")
    write(tmp_path / "e.de", "")
    with pytest.raises(MlasLoraError, match="holds no examples"):
        list(read_examples(tmp_path / "e", "en-de"))


def test_unknown_language_says_an_iso_code_is_expected(tmp_path):
    path = write(tmp_path / "a.tsv", "a\tb\n")
    with pytest.raises(MlasLoraError, match=r"unknown language code 'xx': expected an ISO 639 language code"):
        list(read_examples(path, "en-xx"))


def _without_datasets(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_hf_without_datasets_installed_says_how_to_install(monkeypatch):
    _without_datasets(monkeypatch)
    with pytest.raises(
        MlasLoraError, match=r"'wmt18' .*needs the optional `datasets` package: pip install 'mlas-lora\[hf\]'"
    ):
        list(read_hf("wmt18", "de-en", "test", "de-en"))
    with pytest.raises(MlasLoraError, match="needs the optional `datasets`"):
        list(read_examples("hf:wmt18:de-en:test", "de-en"))


def _fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hf_offline_failure_is_a_clear_error(monkeypatch):
    def load(name, config, split):
        raise ConnectionError("Couldn't reach 'wmt18' on the Hub (LocalEntryNotFoundError)\nlong trace")

    _fake_datasets(monkeypatch, load)
    with pytest.raises(
        MlasLoraError, match=r"cannot load .*'wmt18'.*ConnectionError: Couldn't reach .*Offline\?"
    ) as err:
        list(read_hf("wmt18", "de-en", "test", "de-en"))
    assert "long trace" not in str(err.value)


def test_hf_translation_and_flores_layouts(monkeypatch):
    tables = {
        "wmt18": [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}],
        "flores": [{"id": 1, "sentence_deu_Latn": "Guten Tag", "sentence_eng_Latn": "Good day"}],
    }
    _fake_datasets(monkeypatch, lambda name, config, split: tables[name])
    assert list(read_hf("wmt18", "de-en", "test", "de-en")) == [
        Example("de", "en", "Hallo Welt", "Hello world")
    ]
    assert list(read_examples("hf:flores::devtest", "en-de")) == [
        Example("en", "de", "Good day", "Guten Tag")
    ]
    with pytest.raises(MlasLoraError, match=r"row 0: no text for \['zh'\]"):
        list(read_hf("flores", None, "devtest", "en-zh"))
    with pytest.raises(MlasLoraError, match="expected hf:NAME:CONFIG:SPLIT"):
        list(read_examples("hf:wmt18", "de-en"))


def _many_lines_then_a_bad_one(path, good: int, row, bad: str):
    with path.open("w", encoding="utf-8") as file:
        file.writelines(row(i) + "\n" for i in range(good))
        file.write(bad + "\n")
    return path


def test_readers_stream_lazily(tmp_path):
    """The first k examples come out without the reader reaching the file's malformed last line;
    a missing file and misaligned files still fail at the call."""
    tsv = _many_lines_then_a_bad_one(tmp_path / "d.tsv", 5000, lambda i: f"src {i}\ttgt {i}", "no tab")
    jsonl = _many_lines_then_a_bad_one(
        tmp_path / "d.jsonl",
        5000,
        lambda i: json.dumps({"translation": {"en": f"s{i}", "de": f"t{i}"}}),
        "{oops",
    )
    _many_lines_then_a_bad_one(tmp_path / "a.en", 5000, lambda i: f"src {i}", "orphan")
    _many_lines_then_a_bad_one(tmp_path / "a.de", 5000, lambda i: f"tgt {i}", "")
    for stream in (
        read_tsv(tsv, "en-de"),
        read_jsonl(jsonl, "en-de"),
        read_aligned(tmp_path / "a", "en-de"),
        read_examples(tsv, "en-de"),
    ):
        assert isinstance(stream, Iterator)
        first = list(itertools.islice(stream, 3))
        assert [e.reference[-1] for e in first] == ["0", "1", "2"]
        with pytest.raises(MlasLoraError, match="line 5001"):
            list(stream)  # the rest of the file is read only now
    # what can be checked before reading still raises at the call
    with pytest.raises(MlasLoraError, match=r"missing\.tsv does not exist"):
        read_tsv(tmp_path / "missing.tsv", "en-de")
    write(tmp_path / "t.en", "a\nb\nc\n")
    write(tmp_path / "t.de", "x\ny\n")
    with pytest.raises(MlasLoraError, match="differ in length"):
        read_aligned(tmp_path / "t", "en-de")


def test_hf_rows_become_examples_one_at_a_time(monkeypatch):
    read = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"translation": {"de": f"Satz {i}", "en": f"Sentence {i}"}}

    _fake_datasets(monkeypatch, lambda name, config, split: rows())
    stream = read_hf("wmt18", "de-en", "train", "de-en")
    assert next(stream) == Example("de", "en", "Satz 0", "Sentence 0")
    assert read == [0]


def test_bad_bytes_a_bom_and_a_directory_are_named(tmp_path):
    from mlas_lora.cli import main
    from mlas_lora.data.readers import read_segments, read_tsv

    bom = tmp_path / "bom.tsv"
    bom.write_bytes("\ufeffHello\tHallo\nBye\tTschüss\n".encode())
    assert [e.source for e in read_tsv(bom, "en-de")] == ["Hello", "Bye"]
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"a\tb\nc\td\n\xff\xfe\tx\n")
    with pytest.raises(MlasLoraError, match=r"bad.tsv:3: not valid UTF-8"):
        list(read_tsv(bad, "en-de"))
    folder = tmp_path / "x.tsv"
    folder.mkdir()
    with pytest.raises(MlasLoraError, match="is a directory"):
        list(read_tsv(folder, "en-de"))
    assert read_segments(bom, "input") == ["Hello\tHallo", "Bye\tTschüss"]
    assert main(["translate", "--model", "unused", "--pair", "en-de", "--input", str(bad)]) == 2


def test_a_truncated_last_line_names_file_and_line(tmp_path, monkeypatch):
    from mlas_lora.data.embedded import load_embedded

    rows = [
        json.dumps({"translation": {"en": f"Open file {i}", "de": f"Datei {i} öffnen"}}) for i in range(3)
    ]
    cut = "\n".join(rows)[:-9]  # the last line ends in the middle of a string
    path = write(tmp_path / "d.jsonl", cut)
    with pytest.raises(MlasLoraError) as err:
        list(read_jsonl(path, "en-de"))
    assert f"{path}, line 3: cut off (the file ends in the middle of a JSON object" in str(err.value)
    home = tmp_path / "home"
    monkeypatch.setenv("MLAS_LORA_HOME", str(home))
    (home / "corpus" / "de").mkdir(parents=True)
    write(home / "corpus" / "de" / "test.jsonl", cut)
    with pytest.raises(MlasLoraError) as err:
        list(read_examples("embedded:test", "de-en"))
    assert f"{home / 'corpus' / 'de' / 'test.jsonl'}, line 3: cut off" in str(err.value)
    assert "rebuild the corpus with `mlas-lora data build --force`" in str(err.value)
    cut = "\n".join(json.dumps(json.loads(r), ensure_ascii=False) for r in rows).encode()[:-9]  # inside "ö"
    (home / "corpus" / "de" / "test.jsonl").write_bytes(cut)
    with pytest.raises(MlasLoraError, match=r"test\.jsonl, line 3: cut off .*data build --force"):
        load_embedded("en-de", "test")
