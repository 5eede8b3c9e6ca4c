"""The two prompting baselines of the paper's tables: 0-shot and 5-shot in-context learning.

In-context demonstrations are drawn, seeded, from the training split of the same direction
(Sec. 4.2: "5-shot"); each test segment gets its own draw so no single demo set dominates.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from mlas_lora.data.records import Example
from mlas_lora.translation.generate import TranslationRequest


def zero_shot_requests(examples: Sequence[Example]) -> list[TranslationRequest]:
    return [TranslationRequest(e.src_lang, e.tgt_lang, e.source) for e in examples]


def demo_pool(train: Sequence[Example], min_words: int = 3, max_words: int = 30) -> list[Example]:
    """Training examples short enough to keep a 5-shot prompt affordable on CPU."""
    return [e for e in train if min_words <= len(e.source.split()) <= max_words]


def in_context_requests(
    examples: Sequence[Example], train: Sequence[Example], shots: int = 5, seed: int = 0
) -> list[TranslationRequest]:
    """One request per test segment with `shots` demonstrations of the same direction."""
    pool = demo_pool(train) or list(train)
    requests = []
    for index, example in enumerate(examples):
        same = [d for d in pool if d.direction == example.direction and d.source != example.source]
        rng = random.Random(zlib.crc32(f"{seed}|{example.pair}|{index}".encode()))
        demos = tuple(rng.sample(same, min(shots, len(same))))
        requests.append(TranslationRequest(example.src_lang, example.tgt_lang, example.source, demos))
    return requests
