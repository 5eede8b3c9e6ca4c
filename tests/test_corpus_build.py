"""Embedded corpus: catalog formats, cleaning, and the builder on synthetic .deb/.mo/.po/.whl files."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from mlas_lora.data import embedded
from mlas_lora.data.catalogs import Message, parse_mo, parse_po, write_mo
from mlas_lora.data.cleaning import clean_pair, split_of, strip_mnemonics
from mlas_lora.data.debian import deb_control, deb_files, read_ar, write_ar
from mlas_lora.data.embedded import build_corpus, corpus_stats, embedded_available, load_embedded
from mlas_lora.data.pins import LIBREOFFICE_L10N
from mlas_lora.data.records import Example
from mlas_lora.data.sources import locale_code
from mlas_lora.errors import MlasLoraError

FRACS = dict(test_frac=0.3, dev_frac=0.3)
SENTENCES = [f"Open the stored document number {i} now" for i in range(40)]
LO_DIR = "./usr/lib/libreoffice/program/resource/{}/LC_MESSAGES/{}"

DE_UI = [
    (f"c{i}", en, f"Öffne das gespeicherte Dokument Nummer {i} jetzt") for i, en in enumerate(SENTENCES)
] + [
    ("ctx1", "~Save all files now", "Alle Dateien jetzt ~speichern"),
    ("ctx2", "Save all files now", "Alle Dateien jetzt speichern"),
    ("ctx3", "Save all files now", "Sämtliche Dateien speichern"),
    ("p1", "%s", "%s"),
    ("p2", "<b>%1</b>", "<b>%1</b>"),
    ("p3", "%(name)s:", "%(name)s :"),
    ("same", "PDF export settings here", "PDF export settings here"),
    ("ws", "  Insert\n  a   new\trow here ", "Neue Zeile\n hier   einfügen"),
    ("ph", "Delete %(count)s items from $1 now", "%(count)s Elemente aus $1 jetzt löschen"),
    ("ui|center", "_Center the text block", "Textblock z_entrieren"),
    (
        "",
        "One file was deleted\x00%d files were deleted",
        "Eine Datei wurde gelöscht\x00%d Dateien wurden gelöscht",
    ),
    ("u", "Untranslated string here", ""),
    ("s1", "Save", "Speichern"),
    ("s2", "Close file", "Datei schließen"),
]
DE_KEPT = {
    "Save all files now": "Alle Dateien jetzt speichern",
    "Insert a new row here": "Neue Zeile hier einfügen",
    "Delete %(count)s items from $1 now": "%(count)s Elemente aus $1 jetzt löschen",
    "Center the text block": "Textblock zentrieren",
    "One file was deleted": "Eine Datei wurde gelöscht",
    "Save": "Speichern",
    "Close file": "Datei schließen",
}
ZH_UI = [(f"c{i}", en, f"立即打开第{i}号文档") for i, en in enumerate(SENTENCES[:30])] + [
    ("ctx1", "~Save all files now", "立即保存所有文件(~S)"),
    ("x", "Print the whole page again", "再次打印整页"),
]
DE_PO = r"""# German translation
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

#: forms.py:10
msgid "Please enter a valid email address"
msgstr "Bitte eine gültige E-Mail-Adresse eingeben"

#, fuzzy, python-format
msgid "This guess is marked as fuzzy"
msgstr "Diese Vermutung ist unscharf"

msgid ""
"Line one\n"
"line two with \"quotes\" here"
msgstr "Zeile eins\nZeile zwei mit \"Anführungszeichen\" hier"

msgctxt "button"
msgid "Publish the page right now"
msgstr "Seite sofort veröffentlichen"

msgid "Open the stored document number 3 now"
msgstr "Öffne Dokument 3 jetzt"

msgid "Log in"
msgstr "Anmelden"

msgid "%(count)s page was deleted from the site"
msgid_plural "%(count)s pages were deleted from the site"
msgstr[0] "%(count)s Seite wurde von der Website gelöscht"
msgstr[1] "%(count)s Seiten wurden von der Website gelöscht"

#~ msgid "An obsolete message here"
#~ msgstr "Eine veraltete Nachricht"
"""
DE_OOD = {
    "Please enter a valid email address": "Bitte eine gültige E-Mail-Adresse eingeben",
    'Line one line two with "quotes" here': 'Zeile eins Zeile zwei mit "Anführungszeichen" hier',
    "Publish the page right now": "Seite sofort veröffentlichen",
    "%(count)s page was deleted from the site": "%(count)s Seite wurde von der Website gelöscht",
}
ZH_PO = 'msgid "Please enter a valid email address"\nmsgstr "请输入有效的电子邮件地址"\n'
ZH_HANT_PO = 'msgid "Please enter a valid email address"\nmsgstr "請輸入有效的電子郵件地址"\n'


def tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nDescription: test\n extra line\n"
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": tar_xz({"./control": control.encode()}),
        "data.tar.xz": tar_xz(files),
    }
    path.write_bytes(write_ar(members))
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A from_dir with two LibreOffice-like .deb files, a wheel with .po catalogs and a loose .po."""
    root = tmp_path / "in"
    root.mkdir()
    make_deb(root / "libreoffice-l10n-de_1.0_all.deb", "libreoffice-l10n-de", LIBREOFFICE_L10N, {
        LO_DIR.format("de", "sw.mo"): write_mo(DE_UI[:30]),
        LO_DIR.format("de", "sc.mo"): write_mo(DE_UI[30:]),
        "./usr/share/doc/readme.txt": b"not a catalog",
    })  # fmt: skip
    make_deb(root / "libreoffice-l10n-zh-cn_1.0_all.deb", "libreoffice-l10n-zh-cn", LIBREOFFICE_L10N, {
        LO_DIR.format("zh-CN", "sw.mo"): write_mo(ZH_UI),
    })  # fmt: skip
    with zipfile.ZipFile(root / "webapp-2.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("webapp/locale/zh_Hans/LC_MESSAGES/django.po", ZH_PO)
        wheel.writestr("webapp/locale/zh_Hant/LC_MESSAGES/django.po", ZH_HANT_PO)
        wheel.writestr("webapp/locale/fr/LC_MESSAGES/django.po", ZH_PO)
    (root / "po").mkdir()
    (root / "po" / "de.po").write_text(DE_PO, encoding="utf-8")
    return root


def read_split(out: Path, lang: str, split: str) -> dict[str, str]:
    rows = [
        json.loads(line)["translation"] for line in (out / lang / f"{split}.jsonl").read_text().splitlines()
    ]
    return {row["en"]: row[lang] for row in rows}


# --- formats -----------------------------------------------------------------------------------


def test_mo_round_trip_with_context_and_plural():
    data = write_mo([("menu", "~Open", "Ö~ffnen"), ("", "a file\x00%d files", "eine Datei\x00%d Dateien")])
    assert sorted(parse_mo(data)) == [
        Message("", "a file", "eine Datei"),
        Message("menu", "~Open", "Ö~ffnen"),
    ]
    with pytest.raises(MlasLoraError, match="x.mo: not a .mo catalog"):
        parse_mo(b"\0" * 40, "x.mo")


def test_po_parser_reads_multiline_escapes_and_skips_fuzzy_obsolete_header():
    messages = parse_po(DE_PO, "de.po")
    assert {m.source: m.translation for m in messages} == {
        "Please enter a valid email address": "Bitte eine gültige E-Mail-Adresse eingeben",
        'Line one\nline two with "quotes" here': 'Zeile eins\nZeile zwei mit "Anführungszeichen" hier',
        "Publish the page right now": "Seite sofort veröffentlichen",
        "Open the stored document number 3 now": "Öffne Dokument 3 jetzt",
        "Log in": "Anmelden",
        "%(count)s page was deleted from the site": "%(count)s Seite wurde von der Website gelöscht",
    }
    assert [m.context for m in messages if m.context] == ["button"]
    with pytest.raises(MlasLoraError, match=r"bad.po, line 2: cannot read"):
        parse_po('msgid "a"\nmsgstr = "b"\n', "bad.po")


def test_ar_and_deb_reading():
    members = {"debian-binary": b"2.0\n", "odd": b"123"}
    assert read_ar(write_ar(members)) == members
    with pytest.raises(MlasLoraError, match="not an ar archive"):
        read_ar(b"PK\x03\x04", "x.deb")


def test_deb_control_and_files(tmp_path):
    deb = make_deb(
        tmp_path / "p.deb", "pkg", "1:2.3-4", {"./a/x.mo": write_mo([("", "Hi", "Hallo")]), "./b.txt": b""}
    )
    assert deb_control(deb)["Version"] == "1:2.3-4"
    assert [name for name, _ in deb_files(deb, ".mo")] == ["./a/x.mo"]


@pytest.mark.parametrize(
    "text,expected",
    [("~Open", "Open"), ("Save &As", "Save As"), ("Date&Time", "Date&Time"), ("a &amp; b", "a &amp; b"),
     ("Z_entriert", "Zentriert"), ("PDF_/A", "PDF/A"), ("snake_case_name", "snake_case_name"),
     ("保存(~S)", "保存"), ("打开(_O)", "打开"), ("%PRODUCT_NAME _x", "%PRODUCT_NAME x"), ("%(a_b)s _y", "%(a_b)s y")],
)  # fmt: skip
def test_strip_mnemonics_keeps_placeholders(text, expected):
    assert strip_mnemonics(text, underscore=True) == expected


def test_clean_pair_drops_placeholder_only_and_identical():
    assert clean_pair("%s", "%s") is None
    assert clean_pair("<b>%1</b>", "<i>%1</i>") is None
    assert clean_pair("Same text", " Same  text ") is None
    assert clean_pair(" Delete  $1\n now", "$1 jetzt löschen") == ("Delete $1 now", "$1 jetzt löschen")


def test_locale_codes():
    assert [locale_code(x) for x in ("zh-CN", "zh_Hans", "zh_Hant", "zh_TW", "tr_TR", "de", "pt_BR")] == [
        "zh", "zh", None, None, "tr", "de", "pt",
    ]  # fmt: skip


# --- builder -------------------------------------------------------------------------------------


def test_build_cleans_dedups_and_splits(inputs, tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    de = {s: read_split(out, "de", s) for s in embedded.SPLITS}
    ui = de["train"] | de["dev"] | de["test"]
    expected = {
        en: f"Öffne das gespeicherte Dokument Nummer {i} jetzt" for i, en in enumerate(SENTENCES)
    } | DE_KEPT
    assert ui == expected
    assert de["ood"] == DE_OOD
    assert read_split(out, "zh", "ood") == {"Please enter a valid email address": "请输入有效的电子邮件地址"}
    zh_ui = read_split(out, "zh", "train") | read_split(out, "zh", "dev") | read_split(out, "zh", "test")
    assert zh_ui["Save all files now"] == "立即保存所有文件" and len(zh_ui) == 32
    assert manifest["counts"]["de"] == {s: len(de[s]) for s in embedded.SPLITS}
    assert sum(manifest["counts"]["zh"][s] for s in ("train", "dev", "test")) == 32
    # golden: the split hash must not drift between machines or versions
    assert manifest["counts"]["de"] == {"train": 22, "dev": 9, "test": 16, "ood": 4}
    assert all(manifest["counts"][x][s] > 0 for x in ("de", "zh") for s in ("train", "dev", "test"))


def test_split_invariants(inputs, tmp_path):
    out = tmp_path / "corpus"
    build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    english = {s: {x: set(read_split(out, x, s)) for x in ("de", "zh")} for s in embedded.SPLITS}
    for split in ("train", "dev", "test"):
        for lang in ("de", "zh"):
            assert all(split_of(en, **FRACS) == split for en in english[split][lang])
    shared = english["test"]["de"] & english["test"]["zh"]
    assert len(shared) >= 5 and english["test"]["zh"] - english["test"]["de"] <= {
        "Print the whole page again"
    }
    all_train = english["train"]["de"] | english["train"]["zh"]
    for split in ("dev", "test", "ood"):
        assert not all_train & (english[split]["de"] | english[split]["zh"])
    assert all(
        len(en.split()) >= 4 for x in ("de", "zh") for s in ("dev", "test", "ood") for en in english[s][x]
    )
    assert {"Save", "Close file"} <= english["train"]["de"]


def test_load_embedded_reverses_filters_and_limits(inputs, tmp_path):
    out = tmp_path / "corpus"
    build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    forward, backward = (
        load_embedded("en-de", "train", out_dir=out),
        load_embedded("de-en", "train", out_dir=out),
    )
    assert [Example(e.tgt_lang, e.src_lang, e.reference, e.source) for e in forward] == backward
    assert forward[0].pair == "en-de" and len(forward) == len(read_split(out, "de", "train"))
    assert all(len(e.source.split()) >= 4 for e in load_embedded("en-de", "train", min_words=4, out_dir=out))
    full = load_embedded("en-de", "train", out_dir=out)
    small, large = (load_embedded("en-de", "train", limit=n, out_dir=out) for n in (5, 10))
    assert len(small) == 5 and set(small) <= set(large) <= set(full)
    assert small == load_embedded("en-de", "train", limit=5, out_dir=out)
    assert small != load_embedded("en-de", "train", limit=5, seed=1, out_dir=out)
    assert embedded_available(("de", "zh"), out_dir=out) and not embedded_available(("de", "fi"), out_dir=out)


def test_load_embedded_errors(tmp_path):
    with pytest.raises(MlasLoraError, match="no embedded corpus file .*build it with `mlas-lora data build`"):
        load_embedded("en-de", "test", out_dir=tmp_path)
    with pytest.raises(MlasLoraError, match="unknown split 'valid'"):
        load_embedded("en-de", "valid", out_dir=tmp_path)
    with pytest.raises(MlasLoraError, match="de-zh has no English side"):
        load_embedded("de-zh", "test", out_dir=tmp_path)


def test_manifest_and_stats(inputs, tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    by_package = {s["package"]: s for s in manifest["sources"]}
    assert by_package["libreoffice-l10n-de"]["version"] == LIBREOFFICE_L10N == "4:7.4.7-1+deb12u14"
    assert by_package["webapp"]["version"] == "2.1" and by_package["de.po"]["domain"] == "ood"
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert set(manifest["english_overlap"].values()) == {0}
    stats = corpus_stats(out)
    counts = manifest["counts"]["de"]
    assert f"de    {counts['train']:>8}{counts['dev']:>8}{counts['test']:>8}{counts['ood']:>8}" in stats
    assert f"libreoffice-l10n-zh-cn {LIBREOFFICE_L10N} (" in stats and stats.endswith("-> ok")
    (out / "de" / "test.jsonl").write_text(
        (out / "de" / "test.jsonl").read_text()
        + json.dumps({"translation": {"en": "Save", "de": "x"}})
        + "\n"
    )
    assert "'train/test': 1" in corpus_stats(out) and corpus_stats(out).endswith("-> FAILED")


def test_rebuild_skipped_when_unchanged_and_redone_on_force_or_new_input(inputs, tmp_path):
    out = tmp_path / "corpus"
    first = build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    (out / "marker").write_text("kept while nothing changes")
    assert build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS) == first
    assert (out / "marker").exists()
    build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, force=True, **FRACS)
    assert not (out / "marker").exists()
    (out / "marker").write_text("x")
    changed = build_corpus(
        ("de", "zh"), from_dir=inputs, out_dir=out, progress=False, test_frac=0.2, dev_frac=0.3
    )
    assert not (out / "marker").exists() and changed["fingerprint"] != first["fingerprint"]


def test_failed_build_leaves_previous_corpus_and_no_temp(inputs, tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, **FRACS)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_write = Path.write_text

    def failing_write(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError("disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build_corpus(("de", "zh"), from_dir=inputs, out_dir=out, progress=False, force=True, **FRACS)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert embedded_available(("de", "zh"), out_dir=out)


def test_bad_inputs_are_clear_errors(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "apt_available", lambda: False)
    with pytest.raises(MlasLoraError, match="apt-get is not available .*from_dir=DIR"):
        build_corpus(("de",), out_dir=tmp_path / "c", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlasLoraError, match=r"holds no \.deb, \.whl, \.mo or \.po files"):
        build_corpus(("de",), from_dir=tmp_path / "empty", out_dir=tmp_path / "c")
    with pytest.raises(MlasLoraError, match="unknown language code 'xx'"):
        build_corpus(("de", "xx"), from_dir=inputs, out_dir=tmp_path / "c")
    (inputs / "broken.deb").write_bytes(b"not a deb")
    with pytest.raises(MlasLoraError, match=r"broken\.deb: not an ar archive"):
        build_corpus(("de",), from_dir=inputs, out_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_real_embedded_corpus_targets():
    """The built corpus (`mlas-lora data build`) meets the sizes the experiments rely on."""
    if not embedded_available():
        pytest.skip("embedded corpus not built")
    counts = embedded.read_corpus_manifest()["counts"]
    for lang, by_split in counts.items():
        assert by_split["train"] >= 5000 and by_split["test"] >= 500 and by_split["dev"] >= 800, lang
    assembled = corpus_stats()
    assert assembled.endswith("-> ok")


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbled_data_tar(path: Path) -> None:
    members = read_ar(path.read_bytes())
    members["data.tar.xz"] = members["data.tar.xz"][:40] + b"\x00" * 200
    path.write_bytes(write_ar(members))


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not really a zip")


def _bad_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as wheel:  # stored, so a flipped byte fails the CRC check
        wheel.writestr("webapp/locale/zh_Hans/LC_MESSAGES/django.po", ZH_PO)
    data = bytearray(path.read_bytes())
    data[data.index(b"msgstr") + 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _latin1_po(path: Path) -> None:
    path.write_bytes(DE_PO.encode("latin-1"))


@pytest.mark.parametrize(
    ("name", "damage", "what"),
    [
        ("libreoffice-l10n-de_1.0_all.deb", _cut_in_half, "truncated .deb"),
        ("libreoffice-l10n-de_1.0_all.deb", _garbled_data_tar, "corrupt .deb"),
        ("webapp-2.1-py3-none-any.whl", _not_a_zip, "not a valid wheel (zip) file"),
        ("webapp-2.1-py3-none-any.whl", _bad_member, "corrupt wheel"),
        ("po/de.po", _latin1_po, "not valid UTF-8"),
    ],
)
def test_a_corrupt_input_file_is_named_and_nothing_is_built(
    inputs, tmp_path, monkeypatch, capsys, name, damage, what
):
    from mlas_lora.cli import main

    damage(inputs / name)
    with pytest.raises(MlasLoraError) as err:
        build_corpus(("de", "zh"), from_dir=inputs, out_dir=tmp_path / "c", progress=False)
    assert str(err.value).startswith(str(inputs / name)) and what in str(err.value), str(err.value)
    assert "download it again or remove it from the folder" in str(err.value)
    assert not (tmp_path / "c").exists()
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    assert main(["data", "build", "--from", str(inputs)]) == 2
    assert f"mlas-lora: error: {inputs / name}" in capsys.readouterr().err


def test_a_build_that_finds_no_pair_is_an_error(tmp_path, monkeypatch, capsys):
    from mlas_lora.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "fr.po").write_text(DE_PO, encoding="utf-8")  # French only: no pair for de or zh
    with pytest.raises(MlasLoraError) as err:
        build_corpus(("de", "zh"), from_dir=tmp_path / "in", out_dir=tmp_path / "c", progress=False)
    assert f"{tmp_path / 'in'}: the 1 file(s) read give no in-domain translation pair for de, zh" in str(
        err.value
    )
    assert "libreoffice-l10n-<lang>" in str(err.value)
    assert not (tmp_path / "c").exists()
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    assert main(["data", "build", "--from", str(tmp_path / "in")]) == 2
    assert "no in-domain translation pair for cs, de, et, fi, ru, tr, zh" in capsys.readouterr().err
    assert not (tmp_path / "home" / "corpus").exists()
