"""Any ISO 639 language: names from langcodes (CLDR), the paper's names pinned, clear errors for the rest,
and the target-language choices of the metrics (BLEU tokenizer, METEOR tokens, FLORES columns)."""

import json

import pytest
from sacrebleu.metrics import BLEU, CHRF

from mlas_lora.cli import main
from mlas_lora.config import load_config
from mlas_lora.data.readers import flores_column
from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation import metrics
from mlas_lora.evaluation.meteor import meteor_signature, meteor_tokens
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.languages import Direction, language_name
from mlas_lora.prompting import build_prompt
from mlas_lora.testing.tiny import tiny_tokenizer

PAPER_NAMES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "et": "Estonian",
    "fi": "Finnish",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}
"""The names every run so far put in its prompts (so in its stage and hypothesis keys)."""


def test_the_paper_languages_keep_their_names_whatever_cldr_says(monkeypatch):
    import langcodes

    monkeypatch.setattr(langcodes.Language, "display_name", lambda self, *a, **k: "Renamed")
    language_name.cache_clear()
    try:
        assert {code: language_name(code) for code in PAPER_NAMES} == PAPER_NAMES
        assert language_name("fr") == "Renamed"  # the others do come from the package
    finally:
        language_name.cache_clear()
    prompt = build_prompt(tiny_tokenizer(chat=False), "en", "zh", "Open file")
    assert prompt == "Translate the following text from English to Chinese.\nEnglish: Open file\nChinese:"


def test_en_fr_is_a_direction_and_the_prompt_says_french():
    config = load_config(ExperimentConfig, None, ["data.directions=[en-fr, yue-en]"])
    assert config.data.directions == ["en-fr", "yue-en"]
    prompt = build_prompt(tiny_tokenizer(chat=False), "en", "fr", "Open file")
    assert prompt == "Translate the following text from English to French.\nEnglish: Open file\nFrench:"
    assert (language_name("yue"), language_name("ja"), language_name("tl")) == (
        "Cantonese",
        "Japanese",
        "Tagalog",
    )


def test_evaluate_lang_fr_scores_a_tiny_pair(tmp_path, capsys):
    hyps, refs = ["le chat est assis sur le tapis"], ["le chat était assis sur le tapis"]
    (tmp_path / "h.txt").write_text(hyps[0] + "\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text(refs[0] + "\n", encoding="utf-8")
    args = ["--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "r.txt"), "--lang", "fr"]
    code = main(["evaluate", *args, "--metrics", "bleu,chrf", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert code == 0 and "target language fr" in out
    scores = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["metrics"]
    assert scores["bleu"]["score"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert scores["chrf"]["score"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    assert "tok:13a" in scores["bleu"]["signature"]


@pytest.mark.parametrize(
    "code, expected",
    [
        ("xx", "unknown language code 'xx': expected an ISO 639 language code"),
        ("english", "unknown language code 'english': expected an ISO 639 language code"),
        ("und", "language code 'und' names no single language"),
        ("fra", "language code 'fra': write 'fr' (French), its ISO 639-1 code"),
        ("FR", "language code 'FR': write it in lower case, 'fr'"),
    ],
)
def test_an_unknown_code_is_one_clear_line(code, expected, tmp_path, capsys):
    with pytest.raises(MlasLoraError) as err:
        load_config(ExperimentConfig, None, [f"data.directions=[en-{code}]"])
    assert f"data.directions: {expected}" in str(err.value)
    (tmp_path / "h.txt").write_text("a\n", encoding="utf-8")
    code_ = main(
        ["evaluate", "--hyp", str(tmp_path / "h.txt"), "--ref", str(tmp_path / "h.txt"), "--lang", code]
    )
    err_text = capsys.readouterr().err
    assert code_ == 2 and err_text.startswith(f"mlas-lora: error: {expected}") and err_text.count("\n") == 1


def test_bleu_and_meteor_split_unspaced_targets(monkeypatch):
    assert [metrics.bleu_tokenizer(c) for c in ("en", "de", "fr", "zh", "th")] == [
        "13a",
        "13a",
        "13a",
        "zh",
        "char",
    ]
    monkeypatch.setattr(metrics, "_importable", lambda modules: False)
    assert (metrics.bleu_tokenizer("ja"), metrics.bleu_tokenizer("ko")) == ("char", "13a")
    assert "pip install 'sacrebleu[ja]'" in metrics.bleu_note("ja") and metrics.bleu_note("fr") is None
    monkeypatch.setattr(metrics, "_importable", lambda modules: True)
    assert (metrics.bleu_tokenizer("ja"), metrics.bleu_tokenizer("ko")) == ("ja-mecab", "ko-mecab")
    assert metrics.bleu_note("ja") is None
    assert meteor_tokens("今日は 晴れ", "ja") == [
        "今",
        "日",
        "は",
        "晴",
        "れ",
    ] and "tok:char" in meteor_signature("ja")
    assert meteor_tokens("le chat", "fr") == ["le", "chat"] and "tok:whitespace" in meteor_signature("fr")


def test_japanese_bleu_without_mecab_counts_characters(monkeypatch):
    monkeypatch.setattr(metrics, "_importable", lambda modules: False)
    hyps, refs = ["今日は良い天気です"], ["今日は良い天気ですね"]
    result = metrics.sacrebleu_score("bleu", hyps, refs, "ja")
    assert "tok:char" in result.signature
    assert (
        result.score == pytest.approx(BLEU(tokenize="char").corpus_score(hyps, [refs]).score)
        and result.score > 50
    )


def test_flores_columns_of_any_language():
    columns = ["id", "sentence_eng_Latn", "sentence_fra_Latn", "sentence_zho_Hans", "sentence_zho_Hant"]
    assert [flores_column(c, columns) for c in ("en", "fr", "zh")] == [
        "sentence_eng_Latn",
        "sentence_fra_Latn",
        "sentence_zho_Hans",
    ]
    assert flores_column("kab", columns) == "sentence_kab"  # not there: the reader's error lists the columns
    assert str(Direction.parse("fr-en")) == "fr-en"
