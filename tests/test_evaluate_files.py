"""`mlas-lora evaluate`: a user's own files scored as sacreBLEU scores them, bootstrap, clear input errors."""

from __future__ import annotations

import json

import pytest
from sacrebleu.metrics import BLEU, CHRF

from mlas_lora.cli import main
from mlas_lora.evaluation import meteor
from mlas_lora.evaluation.files import evaluate_files, read_segments

REFS = ["the cat sat on the mat", "a dog barked at the mailman", "it rained all day in the city"]
HYPS = ["the cat sat on a mat", "the dog barked at a mailman", "it rained the whole day in town"]
BASE = ["a cat is on the mat", "dog barks", "rain all day"]
SACREBLEU_ONLY = ["--metrics", "bleu,chrf", "--bootstrap", "50"]


def _write(path, lines, newline="\n"):
    path.write_text("".join(line + newline for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {
        "hyp": _write(tmp_path / "hyp.txt", HYPS),
        "ref": _write(tmp_path / "ref.txt", REFS),
        "base": _write(tmp_path / "base.txt", BASE),
    }


def _evaluate(capsys, *args):
    """Run the CLI; return its exit code, stdout and stderr."""
    code = main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scores_equal_sacrebleu(files, tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    code, out, _ = _evaluate(
        capsys, "--hyp", files["hyp"], "--ref", files["ref"], "--lang", "de", *SACREBLEU_ONLY, "--json", str(out_json)
    )  # fmt: skip
    assert code == 0
    result = json.loads(out_json.read_text(encoding="utf-8"))
    bleu, chrf = BLEU(), CHRF(word_order=2)
    assert result["metrics"]["bleu"]["score"] == pytest.approx(
        bleu.corpus_score(HYPS, [REFS]).score, abs=1e-9
    )
    assert result["metrics"]["chrf"]["score"] == pytest.approx(
        chrf.corpus_score(HYPS, [REFS]).score, abs=1e-9
    )
    assert result["n_segments"] == 3 and "baseline" not in result["metrics"]["bleu"]
    assert f"BLEU signature: {bleu.get_signature().format()}" in out
    assert f"chrF++ signature: {chrf.get_signature().format()}" in out
    assert f"{result['metrics']['bleu']['score']:.2f}" in out.splitlines()[2]


def test_chinese_target_uses_zh_tokenizer(tmp_path):
    refs, hyps = ["我喜欢吃苹果。", "今天天气很好。"], ["我爱吃苹果。", "今天天气不错。"]
    result = evaluate_files(
        _write(tmp_path / "h", hyps), _write(tmp_path / "r", refs), "zh", metrics=["bleu"]
    )
    bleu = result["metrics"]["bleu"]
    assert "tok:zh" in bleu["signature"]
    assert bleu["score"] == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [refs]).score, abs=1e-9)
    assert bleu["score"] != pytest.approx(BLEU().corpus_score(hyps, [refs]).score)


def test_baseline_gets_paired_bootstrap(files, capsys, tmp_path):
    out_json = tmp_path / "scores.json"
    code, out, _ = _evaluate(
        capsys, "--hyp", files["hyp"], "--ref", files["ref"], "--baseline", files["base"], "--lang", "en",
        *SACREBLEU_ONLY, "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["bootstrap"] == {"n_samples": 50, "seed": 12345}
    for metric, scorer in (("bleu", BLEU()), ("chrf", CHRF(word_order=2))):
        m = result["metrics"][metric]
        base = m["baseline"]
        assert base["score"] == pytest.approx(scorer.corpus_score(BASE, [REFS]).score, abs=1e-9)
        assert base["delta"] == pytest.approx(m["score"] - base["score"]) and base["delta"] > 0
        assert 0 < base["p_value"] <= 1 and base["significant"] == (base["p_value"] < 0.05)
        assert {"mean", "ci95", "system_mean", "system_ci95"} <= set(base)
    assert "baseline" in out.splitlines()[1] and "p-value" in out.splitlines()[1]
    assert f"{result['metrics']['bleu']['baseline']['delta']:+.2f}" in out


def test_identical_systems_are_not_significantly_different(files, capsys, tmp_path):
    out_json = tmp_path / "scores.json"
    code, out, _ = _evaluate(
        capsys, "--hyp", files["hyp"], "--ref", files["ref"], "--baseline", files["hyp"], "--lang", "en",
        *SACREBLEU_ONLY, "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    for m in json.loads(out_json.read_text(encoding="utf-8"))["metrics"].values():
        assert m["baseline"]["delta"] == 0.0
        assert m["baseline"]["p_value"] == 1.0 and m["baseline"]["significant"] is False
    bleu_row = next(line for line in out.splitlines() if line.startswith("BLEU "))
    assert bleu_row.split()[-3:] == ["+0.00", "1.0000", "no"]


def test_input_errors_are_one_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nstill ok\nbroken \xff byte\n")
    short = _write(tmp_path / "short.txt", REFS[:2])
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    missing = str(tmp_path / "nope.txt")
    cases = [
        (["--hyp", missing, "--ref", files["ref"]], ["hypothesis file", missing, "does not exist"]),
        (["--hyp", files["hyp"], "--ref", str(bad)], [f"{bad}:3: not valid UTF-8"]),
        (["--hyp", short, "--ref", files["ref"]], [short, "has 2 lines", files["ref"], "has 3"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--baseline", short], ["baseline file", short, "2 lines"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--src", short], ["source file", short, "2 lines"]),
        (["--hyp", str(empty), "--ref", files["ref"]], ["hypothesis file", str(empty), "is empty"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--metrics", "bleu,comet"], ["--comet-model"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--comet-model", str(tmp_path)], ["--src"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--metrics", "bleu,ter"], ["unknown metric", "ter"]),
        (["--hyp", files["hyp"], "--ref", files["ref"], "--bootstrap", "0"], ["--bootstrap"]),
    ]  # fmt: skip
    for args, expected in cases:
        code, out, err = _evaluate(capsys, *args, "--lang", "de")
        assert code == 2, args
        assert err.startswith("mlas-lora: error: ") and err.count("\n") == 1, err
        assert all(text in err for text in expected), (expected, err)
        assert out == ""


def test_lang_is_required(files, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--hyp", files["hyp"], "--ref", files["ref"]])
    assert exc.value.code == 2 and "--lang" in capsys.readouterr().err


def test_segments_bom_crlf_and_empty_lines(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes("\ufeffthe cat\r\n\r\nsat\r\n".encode())
    assert read_segments(path) == ["the cat", "", "sat"]
    path.write_bytes(b"a\n\nb")
    assert read_segments(path) == ["a", "", "b"]
    path.write_bytes(b"\n")
    assert read_segments(path) == [""]


def test_bom_does_not_reach_the_scores(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes(("\ufeff" + "\n".join(REFS) + "\n").encode())
    result = evaluate_files(_write(tmp_path / "hyp.txt", REFS), ref, "en", metrics=["bleu", "chrf"])
    assert result["metrics"]["bleu"]["score"] == pytest.approx(100.0)
    assert result["metrics"]["chrf"]["score"] == pytest.approx(100.0)


def test_unavailable_meteor_is_reported_not_fatal(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    meteor.load_wordnet.cache_clear()
    code, out, _ = _evaluate(capsys, "--hyp", files["hyp"], "--ref", files["ref"], "--lang", "en")
    meteor.load_wordnet.cache_clear()
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("METEOR ")).split() == ["METEOR", "n/a"]
    assert "METEOR not computed: WordNet 3.0 not found" in out
    assert "BLEU signature: nrefs:1|" in out


def test_json_is_written_atomically(files, tmp_path, capsys):
    out_json = tmp_path / "out" / "scores.json"
    code, out, _ = _evaluate(
        capsys, "--hyp", files["hyp"], "--ref", files["ref"], "--lang", "en", "--metrics", "bleu",
        "--json", str(out_json),
    )  # fmt: skip
    assert code == 0 and f"numbers written to {out_json}" in out
    result = json.loads(out_json.read_text(encoding="utf-8"))
    assert result["files"] == {"hypothesis": files["hyp"], "reference": files["ref"]}
    assert list(result["metrics"]) == ["bleu"] and result["tgt_lang"] == "en"
    assert [p.name for p in out_json.parent.iterdir()] == ["scores.json"]
