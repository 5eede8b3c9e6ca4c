"""Scoring a user's own translation files: what `mlas-lora evaluate` computes, prints and saves.

The inputs are what every MT evaluation tool reads: plain UTF-8 text, one segment per line, line i
of each file being the same sentence. Lines are counted as `wc -l` counts them (plus an unterminated
last line): a trailing newline adds no segment, while an empty line is a segment, since an empty
hypothesis is a valid if poor translation. A UTF-8 byte order mark at the start of a file and a
carriage return before each newline (files saved on Windows) are dropped.

The scores are those of `mlas_lora.evaluation.metrics` (sacreBLEU's BLEU and chrF++ with their
signatures, METEOR, COMET from a local checkpoint). Given a baseline, BLEU and chrF++ also get
sacreBLEU's paired bootstrap resampling (Koehn, 2004): delta = system - baseline and the p-value
of "both systems score the same"; METEOR and COMET get the baseline's score and the delta only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlas_lora.data.readers import read_segments
from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.metrics import (
    DEFAULT_METRICS,
    SIGNIFICANCE_METRICS,
    bleu_note,
    paired_bootstrap,
    score_corpus,
)
from mlas_lora.evaluation.report import METRIC_NAMES
from mlas_lora.languages import language_name
from mlas_lora.stage_files import write_json_atomic

ALPHA = 0.05


def read_parallel_files(paths: Mapping[str, str | os.PathLike | None]) -> dict[str, list[str]]:
    """Segments of each given file, keyed by role; every file must have as many lines as the reference."""
    segments = {role: read_segments(path, role) for role, path in paths.items() if path is not None}
    n_ref = len(segments["reference"])
    for role, lines in segments.items():
        if len(lines) != n_ref:
            raise MlasLoraError(
                f"{role} file {paths[role]} has {len(lines)} lines but reference file "
                f"{paths['reference']} has {n_ref}: line i of every file must be the same segment"
            )
    return segments


def _baseline_fields(score: float, base_score: float, bootstrap: dict | None) -> dict:
    """Baseline score and delta; p-value and significance where a paired bootstrap was run."""
    if bootstrap is None:
        return {"score": base_score, "delta": score - base_score, "p_value": None, "significant": None}
    return {
        "score": bootstrap["score_b"],
        "delta": bootstrap["delta"],
        "p_value": bootstrap["p_value"],
        "significant": bootstrap["p_value"] < ALPHA,
        "mean": bootstrap["mean_b"],
        "ci95": bootstrap["ci95_b"],
        "system_mean": bootstrap["mean_a"],
        "system_ci95": bootstrap["ci95_a"],
    }


def evaluate_segments(
    hypotheses: Sequence[str],
    references: Sequence[str],
    tgt_lang: str,
    metrics: Sequence[str] | None = None,
    baseline: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    comet_model: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 12345,
) -> dict:
    """Corpus scores of a system (and, given one, of a baseline with the paired bootstrap), JSON-ready.

    metrics None means BLEU, chrF++ and METEOR, plus COMET when a checkpoint is given.
    """
    if metrics is None:
        metrics = (*DEFAULT_METRICS, "comet") if comet_model is not None else DEFAULT_METRICS
    scores = score_corpus(hypotheses, references, tgt_lang, metrics, sources, comet_model)
    result = {"tgt_lang": tgt_lang, "n_segments": len(references)}
    per_metric = {m: r.to_dict() for m, r in scores.items()}
    if baseline is not None:
        available = [m for m, r in scores.items() if r.available]
        base = score_corpus(baseline, references, tgt_lang, available, sources, comet_model)
        for m in available:
            bootstrap = None
            if m in SIGNIFICANCE_METRICS:
                bootstrap = paired_bootstrap(
                    hypotheses, baseline, references, tgt_lang, m, n_samples=n_bootstrap, seed=seed
                )
            per_metric[m]["baseline"] = _baseline_fields(scores[m].score, base[m].score, bootstrap)
        result.update(alpha=ALPHA, bootstrap={"n_samples": n_bootstrap, "seed": seed})
    return {**result, "metrics": per_metric}


def evaluate_files(
    hyp: str | os.PathLike,
    ref: str | os.PathLike,
    tgt_lang: str,
    baseline: str | os.PathLike | None = None,
    src: str | os.PathLike | None = None,
    **kwargs,
) -> dict:
    """`evaluate_segments` on files (see `read_segments`); the result also names the files it read."""
    language_name(tgt_lang)
    paths = {"hypothesis": hyp, "reference": ref, "baseline": baseline, "source": src}
    segments = read_parallel_files(paths)
    result = evaluate_segments(
        segments["hypothesis"],
        segments["reference"],
        tgt_lang,
        baseline=segments.get("baseline"),
        sources=segments.get("source"),
        **kwargs,
    )
    return {"files": {role: str(p) for role, p in paths.items() if p is not None}, **result}


def _metric_row(name: str, m: Mapping, with_baseline: bool) -> list[str]:
    if not m["available"]:
        return [name, "n/a"] + ["-"] * (4 * with_baseline)
    row = [name, f"{m['score']:.2f}"]
    if with_baseline:
        b = m["baseline"]
        p = "-" if b["p_value"] is None else f"{b['p_value']:.4f}"
        significant = "-" if b["significant"] is None else ("yes" if b["significant"] else "no")
        row += [f"{b['score']:.2f}", f"{b['delta']:+.2f}", p, significant]
    return row


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text columns: the first left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    cells = [
        [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        for r in rows
    ]
    return ["  ".join(row).rstrip() for row in cells]


def format_evaluation(result: Mapping) -> str:
    """The readable report: a table of scores (and baseline, delta, p-value), then signatures and notes."""
    with_baseline = "bootstrap" in result
    header = ["metric", "score"]
    if with_baseline:
        header += ["baseline", "delta", "p-value", f"p < {result['alpha']}"]
    rows = [header]
    notes, signatures = [], []
    for metric, m in result["metrics"].items():
        name = METRIC_NAMES.get(metric, metric)
        rows.append(_metric_row(name, m, with_baseline))
        if m["available"]:
            signatures.append(f"{name} signature: {m['signature']}")
            if metric == "bleu" and (note := bleu_note(result["tgt_lang"])):
                notes.append(note)
        else:
            notes.append(f"{name} not computed: {m['reason']}")
    lines = [f"{result['n_segments']} segments, target language {result['tgt_lang']}", *_aligned(rows)]
    lines += signatures + notes
    if with_baseline:
        b = result["bootstrap"]
        tested = " and ".join(METRIC_NAMES[m] for m in SIGNIFICANCE_METRICS if m in result["metrics"])
        lines.append(
            f"p-value: paired bootstrap resampling (sacreBLEU), {b['n_samples']} resamples, "
            f"seed {b['seed']}, for {tested or 'no metric'}"
        )
    return "\n".join(lines) + "\n"


def write_evaluation(result: Mapping, path: str | os.PathLike) -> Path:
    """Write the result as JSON, atomically (a reader never sees a half-written file)."""
    return write_json_atomic(path, result)
