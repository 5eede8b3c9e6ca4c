"""Significance over training seeds: paired approximate randomization stratified by seed, Holm's
correction across directions, and mean ± sd cells.

A system trained with N seeds has N sets of hypotheses for one test set. `stratified_ar` compares
two systems as MultEval does with optimizer replicates (Clark et al., 2011), with sacreBLEU's
metrics and its approximate randomization (`paired_ar`, Riezler and Maxwell, 2005) inside each
stratum:

- the statistic is the mean over strata k of metric(A_k) - metric(B_k), each a corpus score;
- stratum k pairs A's seed k with B's seed k (a baseline with one output, e.g. zero-shot, is every
  stratum's B);
- one trial swaps A's and B's hypothesis of each segment of each stratum with probability 1/2 and
  recomputes the statistic from the summed sufficient statistics (BLEU's n-gram counts, chrF's
  character and word n-gram counts), so a trial costs one score per stratum and system;
- p = (1 + #trials with |statistic| >= |observed|) / (1 + trials), two-sided. Identical outputs give
  a statistic of 0 in every trial, hence p = 1.

`holm` adjusts the p-values of one family (one challenger, split and metric, across its directions).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.metrics import sacrebleu_metric

TRIALS = 1000


def _stats(scorer, hyps: Sequence[str], references: Sequence[str]) -> np.ndarray:
    return np.asarray(scorer._extract_corpus_statistics(list(hyps), [list(references)]), dtype=np.int64)


def _score(scorer, summed: np.ndarray) -> float:
    return float(scorer._compute_score_from_stats([int(x) for x in summed]).score)


def stratified_ar(
    strata: Sequence[tuple[Sequence[str], Sequence[str]]],
    references: Sequence[str],
    tgt_lang: str,
    metric: str = "bleu",
    trials: int = TRIALS,
    seed: int = 12345,
) -> dict:
    """Paired approximate randomization of A against B over strata [(hyps_a_k, hyps_b_k), ...] (one
    per training seed) on the same references; returns the mean scores, delta (A - B) and p-value."""
    if not strata:
        raise MlasLoraError("stratified_ar: no strata")
    if trials < 1:
        raise MlasLoraError(f"stratified_ar: trials must be >= 1, got {trials}")
    n = len(references)
    for k, (a, b) in enumerate(strata):
        if len(a) != n or len(b) != n:
            raise MlasLoraError(
                f"stratified_ar: stratum {k} has {len(a)} and {len(b)} hypotheses for {n} references"
            )
    scorer = sacrebleu_metric(metric, tgt_lang)
    rng = np.random.default_rng(seed)
    scores_a, scores_b, trial_delta = [], [], np.zeros(trials)
    for a, b in strata:
        stats_a, stats_b = _stats(scorer, a, references), _stats(scorer, b, references)
        scores_a.append(_score(scorer, stats_a.sum(0)))
        scores_b.append(_score(scorer, stats_b.sum(0)))
        swap = rng.integers(0, 2, size=(trials, n), dtype=np.int64)
        moved = swap @ (stats_b - stats_a)  # what A gains (and B loses) where the pair is swapped
        total_a, total_b = stats_a.sum(0) + moved, stats_b.sum(0) - moved
        trial_delta += [
            _score(scorer, ta) - _score(scorer, tb) for ta, tb in zip(total_a, total_b, strict=True)
        ]
    trial_delta /= len(strata)
    observed = (sum(scores_a) - sum(scores_b)) / len(strata)
    extreme = int(np.sum(np.abs(trial_delta) >= abs(observed) - 1e-9))
    return {
        "metric": metric,
        "test": "paired approximate randomization, stratified by seed",
        "strata": len(strata),
        "n_segments": n,
        "trials": trials,
        "seed": seed,
        "score_a": sum(scores_a) / len(strata),
        "score_b": sum(scores_b) / len(strata),
        "delta": observed,
        "p_value": (extreme + 1) / (trials + 1),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order (step-down, monotone, capped at 1)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the sd is None for a single value."""
    return sum(values) / len(values), statistics.stdev(values) if len(values) > 1 else None
