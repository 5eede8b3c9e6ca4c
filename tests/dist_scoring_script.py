"""The awareness pass of a tiny teacher under a launcher; run by tests/test_scale_out.py, not collected.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_scoring_script.py OUT

Every process writes what `score_teacher` returned to OUT/rank-<index>/ (the stages let only the
main process write; here each does, so the test can check that all of them hold the summed scores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mlas_lora.awareness.scoring import save_awareness, score_teacher
from mlas_lora.data.records import Example
from mlas_lora.distributed import rank_and_size
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

SEEDS = {
    "en-de": [
        Example("en", "de", "The cat sleeps.", "Die Katze schläft."),
        Example("en", "de", "We walked along the river until it was dark.", "Wir gingen am Fluss entlang."),
        Example("en", "de", "Hi", "Hallo"),
        Example("en", "de", "Where is the station?", "Wo ist der Bahnhof?"),
        Example("en", "de", "Thank you very much.", "Vielen Dank."),
    ],
    "en-zh": [
        Example("en", "zh", "Good morning, teacher.", "老师早上好。"),
        Example("en", "zh", "It rains.", "下雨了。"),
        Example("en", "zh", "I like tea.", "我喜欢茶。"),
    ],
}
BATCH_SIZE = 2
"""5 batches (3 en-de, 2 en-zh): two processes get 3 and 2, and each sees both pairs."""


def score(model=None):
    """The scores of the tiny teacher (or `model`) on SEEDS, float32."""
    model = tiny_model("qwen2", "teacher", seed=0) if model is None else model
    return score_teacher(
        model, tiny_tokenizer(), SEEDS, batch_size=BATCH_SIZE, dtype=torch.float32, progress=False
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    scores = score()
    rank, size = rank_and_size()
    folder = save_awareness(scores, out / f"rank-{rank}")
    (folder / "world.json").write_text(json.dumps({"rank": rank, "size": size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
