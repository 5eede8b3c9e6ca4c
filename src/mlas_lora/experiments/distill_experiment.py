"""`mlas-lora experiment distill CONFIG` and the `monolingual` analysis (beyond the paper): the
teacher's knowledge moved through its outputs (experiments/distill.py, training/distill.py) beside
MLAS-LoRA's move through its weights.

    distill      DISTILL_SYSTEMS, tables against `lora` (NAME/) and against `mlas-lora`
                 (NAME/vs-mlas-lora/), and costs.md: each distilled training's seconds and its teacher
                 translation seconds over its undistilled counterpart's training
    monolingual  the gain of `lora` and `mlas-lora` over their own 0 point as N teacher-translated
                 monolingual sentences per direction are added (sources of the corpus's training rows
                 that the sample left out, without their references); monolingual.{md,csv,png}
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import replace
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.stage_files import write_text_atomic

DISTILL_SYSTEMS = (
    "zero-shot",
    "teacher",
    "lora",
    "mlas-lora",
    "lora-seqkd",
    "mlas-lora-seqkd",
    "lora-kd",
    "mlas-lora-kd",
    "mlas-lora-seqkd-kd",
)
"""The distill experiment's rows: the untuned student, the teacher (the ceiling), the two undistilled
systems and the five distilled ones (methods/presets.py DISTILL)."""

MONOLINGUAL_SYSTEMS = ("lora", "mlas-lora")
MONOLINGUAL_COUNTS = (0, 500, 2000)
"""The monolingual curve's points: teacher-translated sentences added per trained direction."""

DISTILLED = re.compile(r"-(seqkd-kd|seqkd|kd)(?=$|\.seed)")
"""The suffix of a distilled system's name; without it, the name of its undistilled counterpart."""


def distill_costs(systems) -> str:
    """Markdown: per distilled system, its training seconds and its teacher's translation seconds,
    each over the training seconds of its undistilled counterpart (`lora-kd` over `lora`)."""
    from mlas_lora.experiments.pipeline import training_folder
    from mlas_lora.stage_files import read_small_json

    seconds, teacher = {}, {}
    for system in systems:
        if system.method.trains:
            folder = training_folder(system)[0]
            seconds[system.name] = (read_small_json(folder / "stage.json") or {}).get("seconds")
            teacher[system.name] = (read_small_json(folder / "targets.json") or {}).get(
                "teacher_seconds", 0.0
            )
    lines = [
        "# Cost of distillation\n",
        "Training seconds as the training stage recorded them (a training reused from an earlier run "
        "keeps its own); the teacher's translation seconds are its distill stages' (0 when cached before).\n",
        "| System | training (s) | / undistilled training | teacher translation (s) | / undistilled training |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, own in seconds.items():
        base = DISTILLED.sub("", name)
        if base == name:
            continue
        plain = seconds.get(base)
        ratio = f"{own / plain:.2f}x" if own and plain else "-"
        share = f"{teacher[name] / plain:.2f}x" if plain else "-"
        lines.append(
            f"| {name} | {own if own is not None else '-'} | {ratio} | {teacher[name]:.1f} | {share} |"
        )
    return "\n".join(lines) + "\n"


def unused_sources(config: ExperimentConfig) -> tuple[dict[str, list[str]], int]:
    """Per trained direction, the sources of the corpus's training rows the sample did not take, in a
    seeded order (a larger count extends a smaller one), duplicates and the sampled sources left out;
    and the number of rows the sample took (all directions)."""
    from mlas_lora.experiments.data import load_splits

    taken = load_splits(config.data, ("train",)).train
    every = load_splits(replace(config.data, train_per_direction=None), ("train",)).train
    pools = {}
    for direction, rows in every.items():
        used = {e.source for e in taken[direction]}
        pool = list(
            dict.fromkeys(e.source.strip() for e in rows if e.source.strip() and e.source not in used)
        )
        random.Random(f"monolingual/{config.data.seed}/{direction}").shuffle(pool)
        pools[direction] = pool
    return pools, sum(len(rows) for rows in taken.values())


def monolingual_systems(config: ExperimentConfig, folder: Path, systems, counts=MONOLINGUAL_COUNTS) -> list:
    """The curve's systems: each of `systems` as it is (0) and with N sentences per direction from
    `unused_sources` in NAME/mono-N/DIRECTION.txt (`NAME-monoN`). Where training.max_steps is set it
    grows with the rows (the same share of the data is read: a real training's epochs)."""
    pools, rows = unused_sources(config)
    entries = []
    for n in counts:
        if n == 0:
            entries += list(systems)
            continue
        files = {}
        for direction, pool in pools.items():
            if len(pool) < n:
                raise MlasLoraError(
                    f"monolingual: {direction} has {len(pool)} unused training rows, fewer than {n}"
                )
            path = folder / f"mono-{n}" / f"{direction}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file() or path.read_text(encoding="utf-8") != "\n".join(pool[:n]) + "\n":
                write_text_atomic(path, "\n".join(pool[:n]) + "\n")
            files[direction] = str(path)
        training = {}
        if config.training.max_steps is not None:
            training["max_steps"] = math.ceil(config.training.max_steps * (rows + n * len(pools)) / rows)
        for name in systems:
            entries.append(
                {
                    "name": f"{name}-mono{n}",
                    "preset": name,
                    "data": {"monolingual": files},
                    "training": training,
                }
            )
    return entries


def run_monolingual(
    config: ExperimentConfig,
    folder: Path,
    caption: str = "",
    systems=MONOLINGUAL_SYSTEMS,
    counts=MONOLINGUAL_COUNTS,
) -> Path:
    """The monolingual curve: every point in the main run folder (its teacher stages and the 0 point's
    trainings are the main run's), its report, results and monolingual.{md,csv,png} under `folder`."""
    from mlas_lora.evaluation.report import read_results
    from mlas_lora.experiments.analyses import _run_point, _write_csv, _write_md

    entries = monolingual_systems(config, folder, list(systems), counts)
    _run_point(config, folder, {"systems": entries}, in_main_run=True)
    records = [r for r in read_results(folder / "results" / "test.json") if r.metric == "bleu"]
    average = {}
    for r in records:
        average.setdefault(r.system, []).append(r.score)
    mean = {name: sum(v) / len(v) for name, v in average.items()}
    header = ["sentences per direction", *systems, *(f"{s} gain" for s in systems)]
    table = [header]
    for n in counts:
        scores = [mean.get(name if n == 0 else f"{name}-mono{n}") for name in systems]
        gains = [
            None if s is None or mean.get(name) is None else s - mean[name]
            for s, name in zip(scores, systems, strict=True)
        ]
        table.append([n, *scores, *gains])
    _write_csv(folder / "monolingual.csv", table)
    what = "test BLEU (mean over directions) and its gain over the 0 point as teacher-translated monolingual sentences are added"
    _write_md(folder / "monolingual.md", table, f"{what}, monolingual.png; {caption}" if caption else what)
    _curve_plot(table, list(systems), folder / "monolingual.png")
    return folder


def _curve_plot(table: list[list], systems: list[str], out: Path) -> None:
    from mlas_lora.experiments.analyses import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(systems, start=1 + len(systems)):
        points = [(row[0], row[i]) for row in table[1:] if row[i] is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("teacher-translated monolingual sentences per direction")
    ax.set_ylabel("test BLEU gain over no monolingual data")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
