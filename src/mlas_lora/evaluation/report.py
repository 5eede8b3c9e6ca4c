"""Results files and the paper's tables (Table 1 layout: systems x directions, then the average).

A results file is JSON: {"format": "mlas-lora-results", "version": 1, "records": [...]}, one record
per (system, direction, metric) with the score's signature and the hash of the config that produced
it, so a table can always be traced back to a run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.result import MetricResult
from mlas_lora.stage_files import write_json_atomic

RESULTS_FORMAT = "mlas-lora-results"
RESULTS_VERSION = 1
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++", "meteor": "METEOR", "comet": "COMET"}
MISSING = "—"


@dataclass(frozen=True)
class ResultRecord:
    """One corpus score of one system on one direction."""

    system: str
    direction: str
    metric: str
    score: float
    signature: str
    n_segments: int
    config_hash: str

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "record") -> ResultRecord:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise MlasLoraError(f"{where}: missing field(s) {missing}; a result record needs {names}")
        record = cls(**{n: data[n] for n in names})
        if not isinstance(record.score, int | float) or not math.isfinite(record.score):
            raise MlasLoraError(f"{where}: score must be a finite number, got {record.score!r}")
        return record

    def to_dict(self) -> dict:
        return asdict(self)


def records_from_scores(
    system: str, direction: str, scores: Mapping[str, MetricResult], config_hash: str
) -> list[ResultRecord]:
    """Records for the available scores of `score_corpus`; unavailable metrics have no score to record."""
    return [
        ResultRecord(system, str(direction), r.metric, r.score, r.signature, r.n_segments, config_hash)
        for r in scores.values()
        if r.available
    ]


def write_results(records: Iterable[ResultRecord | Mapping], path: str | os.PathLike) -> Path:
    """Write records as a results file, atomically (a reader never sees a half-written file)."""
    path = Path(path)
    rows = [r if isinstance(r, ResultRecord) else ResultRecord.from_dict(r) for r in records]
    doc = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "records": [r.to_dict() for r in rows]}
    return write_json_atomic(path, doc)


def read_results(path: str | os.PathLike) -> list[ResultRecord]:
    """Read a results file written by `write_results`; any malformed part is an error naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlasLoraError(f"results file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise MlasLoraError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise MlasLoraError(f'{path}: not a results file (expected "format": "{RESULTS_FORMAT}")')
    if doc.get("version") != RESULTS_VERSION:
        raise MlasLoraError(
            f"{path}: results version {doc.get('version')!r}, this code reads {RESULTS_VERSION}"
        )
    return [ResultRecord.from_dict(r, where=f"{path}: record {i}") for i, r in enumerate(doc["records"])]


def _score_grid(records: Sequence[ResultRecord], metric: str) -> dict[tuple[str, str], ResultRecord]:
    grid: dict[tuple[str, str], ResultRecord] = {}
    for r in records:
        if r.metric != metric:
            continue
        key = (r.system, r.direction)
        if key in grid and grid[key].score != r.score:
            raise MlasLoraError(f"two different {metric} scores for system {r.system!r} on {r.direction}")
        grid[key] = r
    if not grid:
        raise MlasLoraError(f"no {metric} results; metrics present: {sorted({r.metric for r in records})}")
    return grid


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _signature_lines(
    grid: dict[tuple[str, str], ResultRecord], metric: str, directions: Sequence[str]
) -> list[str]:
    """One line per distinct signature, naming its directions when there are several (e.g. tok:zh)."""
    by_sig: dict[str, list[str]] = {}
    for d in directions:
        for (_, direction), r in grid.items():
            if direction == d and d not in by_sig.setdefault(r.signature, []):
                by_sig[r.signature].append(d)
    name = METRIC_NAMES.get(metric, metric)
    if len(by_sig) == 1:
        return [f"{name} signature: {next(iter(by_sig))}"]
    return [f"{name} signature ({', '.join(ds)}): {sig}" for sig, ds in by_sig.items()]


def markdown_table(
    records: Sequence[ResultRecord],
    metric: str,
    systems: Sequence[str] | None = None,
    directions: Sequence[str] | None = None,
) -> str:
    """Markdown table like the paper's Table 1: rows systems, columns directions, last column Avg.

    Scores have 2 decimals; a missing score is "—". The average is over the table's directions, and
    only for a system that has all of them (an average over fewer would not be comparable).
    """
    grid = _score_grid(records, metric)
    systems = list(systems or dict.fromkeys(s for s, _ in grid))
    directions = [str(d) for d in (directions or dict.fromkeys(d for _, d in grid))]
    lines = [_row(["System", *directions, "Avg."]), _row(["---", *["---:"] * (len(directions) + 1)])]
    incomplete = False
    for system in systems:
        scores = [grid[(system, d)].score if (system, d) in grid else None for d in directions]
        cells = [MISSING if s is None else f"{s:.2f}" for s in scores]
        complete = all(s is not None for s in scores)
        incomplete |= not complete
        avg = f"{sum(scores) / len(scores):.2f}" if complete else MISSING
        lines.append(_row([system, *cells, avg]))
    lines.append("")
    lines += _signature_lines(grid, metric, directions)
    if incomplete:
        lines.append(f"Avg. {MISSING}: the system lacks a score for some direction.")
    return "\n".join(lines) + "\n"


def significance_table(comparisons: Sequence[Mapping], alpha: float = 0.05) -> str:
    """Markdown table of paired bootstrap results: A vs B per direction, delta (A - B) and p-value.

    Each comparison is `paired_bootstrap(...)`'s dict plus "system_a", "system_b" and "direction".
    A "*" marks p < alpha.
    """
    if not comparisons:
        raise MlasLoraError("no comparisons to tabulate")
    header = ["System A", "System B", "Direction", "Metric", "A", "B", "Δ (A−B)", "p-value"]
    lines = [_row(header), _row(["---"] * 4 + ["---:"] * 4)]
    for i, c in enumerate(comparisons):
        missing = [
            k
            for k in ("system_a", "system_b", "direction", "metric", "score_a", "score_b", "p_value")
            if k not in c
        ]
        if missing:
            raise MlasLoraError(f"comparison {i}: missing {missing}")
        mark = "*" if c["p_value"] < alpha else ""
        metric = METRIC_NAMES.get(c["metric"], c["metric"])
        delta = c["score_a"] - c["score_b"]
        lines.append(
            _row([c["system_a"], c["system_b"], str(c["direction"]), metric, f"{c['score_a']:.2f}",
                  f"{c['score_b']:.2f}", f"{delta:+.2f}", f"{c['p_value']:.4f}{mark}"])
        )  # fmt: skip
    signatures = dict.fromkeys(c.get("signature") for c in comparisons if c.get("signature"))
    lines += ["", f"p-values marked * are below {alpha} (paired bootstrap resampling, sacreBLEU)."]
    lines += [f"Signature: {s}" for s in signatures]
    return "\n".join(lines) + "\n"
