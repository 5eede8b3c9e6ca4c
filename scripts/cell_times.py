"""Wall time of every system of a run folder, from what its stages recorded: the training's seconds
(train-NAME/stage.json) and each split's translation seconds (the headers of hyps/NAME/*.jsonl; 0 for
hypotheses copied from another name). Markdown on stdout.

    python scripts/cell_times.py runs/embedded-4dir [NAME ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def header(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.loads(handle.readline())


def main(run: Path, names: list[str]) -> str:
    names = names or sorted(p.name for p in (run / "hyps").iterdir() if p.is_dir() and "@" not in p.name)
    splits = ("valid", "test", "ood")
    lines = [
        "| system | training (s) | " + " | ".join(f"{s} translation (s)" for s in splits) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in splits) + " |",
    ]
    for name in names:
        stage = run / f"train-{name}" / "stage.json"
        train = json.loads(stage.read_text())["seconds"] if stage.is_file() else None
        cells = []
        for split in splits:
            files = sorted((run / "hyps" / name).glob(f"{split}.*.jsonl"))
            cells.append(f"{sum(header(f)['seconds'] for f in files):.0f}" if files else "—")
        lines.append(f"| {name} | {'—' if train is None else f'{train:.0f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), sys.argv[2:]))
