"""The score a metric hands back (`MetricResult`) and the input checks every metric shares.

Kept apart from `metrics` so that the metric modules (`meteor`, `comet`) and `metrics`, which
dispatches to them, all build on this module instead of on each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from mlas_lora.errors import MlasLoraError


@dataclass(frozen=True)
class MetricResult:
    """One corpus-level score with the signature that produced it (or why it could not be computed)."""

    metric: str
    score: float | None
    signature: str | None
    n_segments: int
    available: bool = True
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def unavailable(metric: str, n_segments: int, reason: str) -> MetricResult:
    """A metric that could not run, with the reason a user can act on."""
    return MetricResult(metric, None, None, n_segments, available=False, reason=reason)


def check_segments(
    hypotheses: Sequence[str], references: Sequence[str], sources: Sequence[str] | None = None
) -> int:
    """Validate parallel inputs and return the number of segments."""
    for name, seq in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(seq, str):
            raise MlasLoraError(f"{name} must be a list of segments, got a single string")
    if len(hypotheses) != len(references):
        raise MlasLoraError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: "
            "every hypothesis needs exactly one reference, in the same order"
        )
    if sources is not None and len(sources) != len(references):
        raise MlasLoraError(f"{len(sources)} sources but {len(references)} references: counts must match")
    if not hypotheses:
        raise MlasLoraError("no segments to score: hypotheses and references are empty")
    return len(hypotheses)
