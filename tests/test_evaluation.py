"""Evaluation layer: sacreBLEU metrics, METEOR/WordNet set-up, COMET availability, significance, tables."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import tarfile

import pytest
from sacrebleu.metrics import BLEU, CHRF

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation import meteor
from mlas_lora.evaluation.comet import comet_available, comet_corpus
from mlas_lora.evaluation.metrics import paired_bootstrap, score_corpus
from mlas_lora.evaluation.report import (
    ResultRecord,
    markdown_table,
    read_results,
    records_from_scores,
    significance_table,
    write_results,
)
from mlas_lora.evaluation.result import MetricResult

REFS = ["the cat sat on the mat", "a dog barked at the mailman", "it rained all day in the city"]
HYPS = ["the cat sat on a mat", "the dog barked at a mailman", "it rained the whole day in town"]


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """A cache home with no WordNet in it."""
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path))
    meteor.load_wordnet.cache_clear()
    yield tmp_path
    meteor.load_wordnet.cache_clear()


class NoSynonyms:
    """A WordNet with no synsets: METEOR then uses exact and stem matches only (hand-computable)."""

    def synsets(self, word):
        return []


# ---------------------------------------------------------------- BLEU / chrF++


def test_bleu_and_chrf_match_sacrebleu_with_signatures():
    res = score_corpus(HYPS, REFS, "en", metrics=("bleu", "chrf"))
    bleu, chrf = BLEU(tokenize="13a"), CHRF(word_order=2)
    assert res["bleu"].score == bleu.corpus_score(HYPS, [REFS]).score
    assert res["chrf"].score == chrf.corpus_score(HYPS, [REFS]).score
    assert res["bleu"].signature == bleu.get_signature().format()
    assert "tok:13a" in res["bleu"].signature
    assert "nw:2" in res["chrf"].signature and "nc:6" in res["chrf"].signature
    assert {r.n_segments for r in res.values()} == {3}
    assert all(r.available and r.reason is None for r in res.values())


def test_hand_computable_bleu_and_chrf():
    same = score_corpus(REFS, REFS, "de", metrics=("bleu", "chrf"))
    assert same["bleu"].score == pytest.approx(100.0)
    assert same["chrf"].score == pytest.approx(100.0)
    # All n-grams match, hypothesis 4 tokens vs reference 5: BLEU = 100 * BP = 100 * exp(1 - 5/4).
    short = score_corpus(["a b c d"], ["a b c d e"], "de", metrics=("bleu",))
    assert short["bleu"].score == pytest.approx(100 * math.exp(-0.25), abs=1e-9)


def test_chinese_target_uses_zh_tokenizer():
    hyp, ref = ["猫坐在垫子上"], ["猫坐在垫子上了"]
    zh = score_corpus(hyp, ref, "zh", metrics=("bleu",))["bleu"]
    assert "tok:zh" in zh.signature
    assert zh.score == pytest.approx(BLEU(tokenize="zh").corpus_score(hyp, [ref]).score)
    assert zh.score == pytest.approx(100 * math.exp(1 - 7 / 6))  # all char n-grams match; BP only
    # With 13a the whole unspaced sentence is one token, which does not match.
    assert BLEU(tokenize="13a").corpus_score(hyp, [ref]).score < 1.0


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a", "b"], ["a", "b", "c"], "2 hypotheses but 3 references"),
        ([], [], "no segments"),
        ("ab", ["a"], "single string"),
    ],
)
def test_input_checks(hyps, refs, message):
    with pytest.raises(MlasLoraError, match=message):
        score_corpus(hyps, refs, "en", metrics=("bleu",))


def test_unknown_metric_and_language():
    with pytest.raises(MlasLoraError, match="unknown metric"):
        score_corpus(HYPS, REFS, "en", metrics=("bleu", "ter"))
    with pytest.raises(MlasLoraError, match="unknown language code"):
        score_corpus(HYPS, REFS, "xx", metrics=("bleu",))


# ---------------------------------------------------------------- significance

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()
BIG_REFS = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(8)) for i in range(40)]


def _damage(sentence: str) -> str:
    """Replace the middle words, so the segment loses most of its higher-order n-gram matches."""
    toks = sentence.split()
    return " ".join(toks[:2] + ["zulu", "yankee", "xray"] + toks[5:])


def test_bootstrap_clearly_better_system_is_significant():
    worse = [r if i % 4 == 0 else _damage(r) for i, r in enumerate(BIG_REFS)]
    out = paired_bootstrap(BIG_REFS, worse, BIG_REFS, "en", n_samples=200, seed=7)
    assert out["score_a"] == pytest.approx(100.0)
    assert out["delta"] == pytest.approx(out["score_a"] - out["score_b"]) and out["delta"] > 30
    assert out["p_value"] < 0.05
    assert out["ci95_a"] == 0.0 and out["ci95_b"] > 0  # A is perfect on every resample
    assert out["mean_b"] == pytest.approx(out["score_b"], abs=2 * out["ci95_b"])
    assert "bs:200" in out["signature"] and "seed:7" in out["signature"]
    assert out == paired_bootstrap(BIG_REFS, worse, BIG_REFS, "en", n_samples=200, seed=7)  # seeded
    assert "SACREBLEU_SEED" not in os.environ or os.environ["SACREBLEU_SEED"] != "7"


def test_bootstrap_equal_systems_are_not_significant():
    a = [_damage(r) if i % 2 else r for i, r in enumerate(BIG_REFS)]
    b = [r if i % 2 else _damage(r) for i, r in enumerate(BIG_REFS)]
    similar = paired_bootstrap(a, b, BIG_REFS, "en", n_samples=200, seed=7)
    assert similar["p_value"] > 0.2
    same = paired_bootstrap(a, a, BIG_REFS, "en", metric="chrf", n_samples=100)
    assert same["delta"] == 0.0 and same["p_value"] == 1.0


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(MlasLoraError, match="sacreBLEU metric"):
        paired_bootstrap(HYPS, HYPS, REFS, "en", metric="meteor")
    with pytest.raises(MlasLoraError, match="seed"):
        paired_bootstrap(HYPS, HYPS, REFS, "en", seed=0)
    with pytest.raises(MlasLoraError, match="2 hypotheses but 3 references"):
        paired_bootstrap(HYPS, HYPS[:2], REFS, "en")


# ---------------------------------------------------------------- METEOR


def test_meteor_without_synonyms_is_hand_computable():
    # Identical 6 tokens: P = R = 1, one chunk: score = 1 - 0.5 * (1/6)^3.
    same = meteor.meteor_corpus(
        ["the cat sat on the mat"], ["the cat sat on the mat"], "en", wordnet=NoSynonyms()
    )
    assert same.score == pytest.approx(100 * (1 - 0.5 / 216))
    # "sat" vs "was sitting" cannot match without WordNet: 5 matches, P = 5/6, R = 5/7, 2 chunks.
    p, r = 5 / 6, 5 / 7
    expected = (p * r / (0.9 * p + 0.1 * r)) * (1 - 0.5 * (2 / 5) ** 3)
    diff = meteor.meteor_corpus(
        ["the cat sat on the mat"], ["the cat was sitting on the mat"], "en", wordnet=NoSynonyms()
    )
    assert diff.score == pytest.approx(100 * expected)
    assert diff.signature.startswith("nrefs:1|case:lc|tok:whitespace|stem:porter|syn:wordnet-3.0")


def test_meteor_tokenizes_chinese_by_character():
    assert meteor.meteor_tokens("猫 坐在", "zh") == ["猫", "坐", "在"]
    assert meteor.meteor_tokens("the  cat", "de") == ["the", "cat"]
    res = meteor.meteor_corpus(["猫坐"], ["猫坐"], "zh", wordnet=NoSynonyms())
    assert res.score == pytest.approx(100 * (1 - 0.5 / 8)) and "tok:char" in res.signature


def test_meteor_unavailable_without_wordnet_and_others_go_on(empty_home):
    ok, reason = meteor.meteor_available()
    assert not ok and "mlas-lora data wordnet" in reason and str(empty_home) in reason
    res = score_corpus(HYPS, REFS, "en")
    assert res["meteor"] == MetricResult("meteor", None, None, 3, available=False, reason=reason)
    assert res["bleu"].available and res["chrf"].available


def test_lexnames_is_the_documented_list():
    lines = meteor.lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1" and lines[29] == "29\tverb.body\t2"
    assert lines[2] == "02\tadv.all\t4" and lines[44] == "44\tadj.ppl\t3"
    assert [int(line.split()[0]) for line in lines] == list(range(45))  # NLTK asserts this


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_deb(path, files: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": buf.getvalue()}))


def test_deb_unpacking_and_missing_packages(tmp_path, empty_home):
    deb = tmp_path / "wordnet-base_1%3a3.0-37_all.deb"
    _fake_deb(deb, {"usr/share/wordnet/data.noun": b"odd-length", "usr/share/doc/x": b"ab"})
    assert meteor.deb_files(deb) == {"usr/share/wordnet/data.noun": b"odd-length", "usr/share/doc/x": b"ab"}
    with pytest.raises(MlasLoraError, match="no wordnet-sense-index_"):
        meteor.prepare_wordnet(from_dir=tmp_path)
    (tmp_path / "wordnet-sense-index_1%3a3.0-37_all.deb").write_bytes(deb.read_bytes())
    with pytest.raises(MlasLoraError, match="usr/share/wordnet/cntlist.rev not found"):
        meteor.prepare_wordnet(from_dir=tmp_path)
    assert not meteor.wordnet_dir().exists()  # nothing half-built is left behind
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "wordnet-base_1_all.deb").write_bytes(b"PK\x03\x04")
    (tmp_path / "broken" / "wordnet-sense-index_1_all.deb").write_bytes(b"PK\x03\x04")
    with pytest.raises(MlasLoraError, match="not an ar archive"):
        meteor.prepare_wordnet(from_dir=tmp_path / "broken")


@pytest.mark.slow
def test_real_wordnet_from_debian_packages(tmp_path, monkeypatch):
    """Builds WordNet 3.0 from Debian's packages (apt-get download) and runs METEOR with synonyms."""
    cached = meteor.downloads_dir() / "wordnet"
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path))
    meteor.load_wordnet.cache_clear()
    has_debs = cached.is_dir() and any(cached.glob("wordnet-sense-index_*.deb"))
    root = meteor.prepare_wordnet(from_dir=cached if has_debs else None)
    assert meteor.meteor_available() == (True, None)
    wn = meteor.load_wordnet()
    assert wn.get_version() == "3.0" and wn.synsets("dog")[0].name() == "dog.n.01"
    res = meteor.meteor_corpus(["the cat sat on the mat"], ["the cat was sitting on the mat"], "en")
    # "sat" matches "sitting" through WordNet: P = 1, R = 6/7, 2 chunks over 6 matches.
    expected = ((6 / 7) / (0.9 + 0.1 * 6 / 7)) * (1 - 0.5 * (2 / 6) ** 3)
    assert res.score == pytest.approx(100 * expected)
    assert json.loads((root / "source.json").read_text())["debs"][0]["file"].startswith("wordnet-base_")
    meteor.load_wordnet.cache_clear()


# ---------------------------------------------------------------- COMET


def test_comet_unavailable_paths(tmp_path):
    ok, reason = comet_available(None)
    assert not ok and "comet_model=PATH" in reason
    res = score_corpus(HYPS, REFS, "en", metrics=("bleu", "comet"), sources=REFS, comet_model=tmp_path)
    assert res["bleu"].available and not res["comet"].available and res["comet"].score is None
    assert res["comet"].reason.startswith(f"no COMET checkpoint at {tmp_path}")
    ckpt = tmp_path / "wmt22-comet-da" / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a real checkpoint")
    if importlib.util.find_spec("comet") is None:
        assert comet_available(ckpt.parent.parent) == (
            False,
            "unbabel-comet is not installed (pip install 'mlas-lora[comet]')",
        )
    else:
        assert comet_available(ckpt.parent.parent, has_sources=False)[1].startswith("COMET needs the source")
    assert comet_corpus(HYPS, REFS, None, None).reason == reason


# ---------------------------------------------------------------- report

SIG = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def _records():
    rows = [
        ("Base", "en-de", 20.0),
        ("Base", "de-en", 25.005),
        ("MLAS-LoRA", "en-de", 22.5),
        ("MLAS-LoRA", "de-en", 26.25),
    ]
    return [ResultRecord(s, d, "bleu", x, SIG, 100, "abc123") for s, d, x in rows]


def test_markdown_table_layout():
    expected = (
        "| System | en-de | de-en | Avg. |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| Base | 20.00 | 25.00 | 22.50 |\n"
        "| MLAS-LoRA | 22.50 | 26.25 | 24.38 |\n"
        "\n"
        f"BLEU signature: {SIG}\n"
    )
    assert markdown_table(_records(), "bleu") == expected


def test_markdown_table_missing_direction_has_no_average():
    table = markdown_table(
        _records()[:3], "bleu", systems=["MLAS-LoRA", "Base"], directions=["en-de", "de-en"]
    )
    assert "| MLAS-LoRA | 22.50 | — | — |" in table and "| Base | 20.00 | 25.00 | 22.50 |" in table
    assert table.index("MLAS-LoRA") < table.index("| Base")
    assert "Avg. —: the system lacks a score for some direction." in table
    with pytest.raises(MlasLoraError, match="no chrf results"):
        markdown_table(_records(), "chrf")


def test_significance_table_marks_small_p():
    comps = [
        {"system_a": "MLAS-LoRA", "system_b": "Base", "direction": "en-de", "metric": "bleu", "score_a": 22.5, "score_b": 20.0, "p_value": 0.001, "signature": "S"},
        {"system_a": "MLAS-LoRA", "system_b": "Base", "direction": "de-en", "metric": "bleu", "score_a": 26.25, "score_b": 26.5, "p_value": 0.4},
    ]  # fmt: skip
    lines = significance_table(comps).splitlines()
    assert lines[2] == "| MLAS-LoRA | Base | en-de | BLEU | 22.50 | 20.00 | +2.50 | 0.0010* |"
    assert lines[3] == "| MLAS-LoRA | Base | de-en | BLEU | 26.25 | 26.50 | -0.25 | 0.4000 |"
    assert lines[-1] == "Signature: S"


def test_results_roundtrip_and_errors(tmp_path):
    scores = score_corpus(HYPS, REFS, "en", metrics=("bleu", "comet"))
    records = _records() + records_from_scores("X", "en-de", scores, "h1")
    assert [r.metric for r in records[4:]] == ["bleu"]  # unavailable COMET is not recorded
    path = write_results([*records[:4], records[4].to_dict()], tmp_path / "out" / "results.json")
    assert read_results(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left
    path.write_text(json.dumps({"format": "mlas-lora-results", "version": 1, "records": [{"system": "A"}]}))
    with pytest.raises(MlasLoraError, match="record 0: missing field"):
        read_results(path)
    path.write_text("{")
    with pytest.raises(MlasLoraError, match="not valid JSON"):
        read_results(path)
