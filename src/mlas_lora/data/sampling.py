"""Taking N examples of a stream: the first N, or N uniformly at random in O(N) memory.

The paper samples 200,000 training pairs and 1,000 seed sentences per direction at random from
WMT18, whose training sets hold millions of rows per direction; a reservoir keeps only the N
chosen rows while the reader streams the rest past.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

SAMPLING = ("random", "first")


def reservoir_sample(items: Iterable[T], n: int, seed: int | str) -> list[T]:
    """N items drawn uniformly without replacement from a stream of unknown length, in stream order.

    Algorithm R (Vitter, 1985): item i (0-based) takes a random slot of the reservoir with
    probability n / (i + 1), so at the end every item is kept with probability n / length while
    memory holds n items. The kept items are returned in their stream order, so a sample reads
    like the corpus and the same seed gives the same list.
    """
    if n < 0:
        raise ValueError(f"sample size must be >= 0, got {n}")
    if n == 0:
        return []
    rng = random.Random(seed)
    kept: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < n:
            kept.append((i, item))
            continue
        slot = rng.randrange(i + 1)
        if slot < n:
            kept[slot] = (i, item)
    kept.sort(key=lambda pair: pair[0])
    return [item for _, item in kept]


def take(items: Iterable[T], n: int | None, how: str, seed: int | str) -> list[T]:
    """All items (n None), the first n (`how='first'`, reads no further), or n at random ('random')."""
    if how not in SAMPLING:
        raise ValueError(f"unknown sampling {how!r} (known: {', '.join(SAMPLING)})")
    if n is None:
        return list(items)
    if how == "first":
        return list(itertools.islice(items, n))
    return reservoir_sample(items, n, seed)
