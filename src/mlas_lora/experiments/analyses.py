"""The paper's analyses, each a set of runs of its own under RUN/experiments/NAME/:

    pairs     Fig. 3: en-de BLEU as training pairs are added (1, 2, 4, ... all), for one shared LoRA
              (lora), one LoRA per pair (M-i) and MLAS-LoRA; a line plot
    transfer  Fig. 2: MLAS-LoRA trained on one direction only (data.train_directions), evaluated on
              every direction; a heatmap of the BLEU change against the untuned student
    family    Fig. 4: the Table 1 comparison on another student (default: the embedded Gemma 3 270M
              under the Qwen teacher, which is cross-family; the paper's is LLaMA-3.1-70B -> 8B)

Each sub-run is a complete run folder (its stages, hypotheses and report), so a killed analysis
continues where it stopped. Two points are the main run itself and run there, reusing its stages and
hypotheses (report under NAME/): the all-directions point of `pairs` (lora, M-i and MLAS-LoRA on
every direction: Table 1/2 rows) and the untuned student of `transfer` (Table 1's zero-shot row).
"""

from __future__ import annotations

import csv
from pathlib import Path

from mlas_lora.config import config_from_dict, merge_trees, to_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig

ANALYSES = ("pairs", "transfer", "family", "monolingual")
"""`monolingual` (beyond the paper) lives in distill_experiment.py."""
PAIRS_SYSTEMS = ("lora", "M-i", "mlas-lora")


def _sub_config(config: ExperimentConfig, folder: Path | None, changes: dict) -> ExperimentConfig:
    """The config with `changes` (systems replaced, not merged), run in `folder` (None: its own)."""
    tree = merge_trees(
        to_dict(config), {**({} if folder is None else {"output_dir": str(folder)}), **changes}
    )
    if "systems" in changes:
        tree["systems"] = changes["systems"]
    return config_from_dict(ExperimentConfig, tree)


def _bleu(report_dir: Path, split: str = "test") -> dict[tuple[str, str], float]:
    from mlas_lora.evaluation.report import read_results

    return {
        (r.system, r.direction): r.score
        for r in read_results(report_dir / "results" / f"{split}.json")
        if r.metric == "bleu"
    }


def _run_point(config: ExperimentConfig, folder: Path, changes: dict, in_main_run: bool = False) -> Path:
    """One point of an analysis; returns where its results are. `in_main_run`: the config's own run
    folder holds its stages and hypotheses (a point that is the main run's), `folder` its report."""
    from mlas_lora.experiments.run import run_experiment

    if in_main_run:
        run_experiment(_sub_config(config, None, changes), report_dir=folder)
        return folder
    sub = _sub_config(config, folder, changes)
    run_experiment(sub)
    return Path(sub.output_dir)


def pair_counts(n: int) -> list[int]:
    """1, 2, 4, ... and n itself."""
    counts, k = [], 1
    while k < n:
        counts.append(k)
        k *= 2
    return [*counts, n]


def run_pairs(config: ExperimentConfig, folder: Path, focus: str = "en-de", caption: str = "") -> Path:
    """Fig. 3: `focus` BLEU of each system as the number of training directions grows."""
    directions = list(config.data.directions)
    if focus not in directions:
        raise MlasLoraError(f"pairs: {focus} is not one of data.directions {directions}")
    others = [d for d in directions if d != focus]
    rows = [["pairs", "directions", *PAIRS_SYSTEMS]]
    for k in pair_counts(len(directions)):
        chosen = [focus, *others[: k - 1]]
        every = k == len(directions)  # the main run's own systems, in its own direction order (keys)
        changes = {"systems": list(PAIRS_SYSTEMS), **({} if every else {"data": {"directions": chosen}})}
        scores = _bleu(_run_point(config, folder / f"pairs-{k}", changes, in_main_run=every))
        rows.append([k, " ".join(chosen), *(scores.get((s, focus)) for s in PAIRS_SYSTEMS)])
    _write_csv(folder / "pairs.csv", rows)
    _line_plot(rows, folder / "pairs.png", f"{focus} BLEU (test)")
    what = f"{focus} BLEU on test as training directions are added (Fig. 3), pairs.png"
    _write_md(folder / "pairs.md", rows, f"{what}; {caption}" if caption else what)
    return folder


def run_transfer(config: ExperimentConfig, folder: Path, caption: str = "") -> Path:
    """Fig. 2: MLAS-LoRA trained on each direction alone, BLEU on every direction minus zero-shot."""
    directions = list(config.data.directions)
    untuned = _bleu(_run_point(config, folder / "zero-shot", {"systems": ["zero-shot"]}, in_main_run=True))
    rows = [["trained on", *directions]]
    for trained in directions:
        changes = {"systems": ["mlas-lora"], "data": {"train_directions": [trained]}}
        scores = _bleu(_run_point(config, folder / f"from-{trained}", changes))
        rows.append([trained, *(scores[("mlas-lora", d)] - untuned[("zero-shot", d)] for d in directions)])
    _write_csv(folder / "transfer.csv", rows)
    _heatmap(rows, folder / "transfer.png")
    what = "BLEU change on test against the untuned student, MLAS-LoRA trained on one direction (Fig. 2)"
    what += ", transfer.png"
    _write_md(folder / "transfer.md", rows, f"{what}; {caption}" if caption else what, signed=True)
    return folder


def run_family(
    config: ExperimentConfig, folder: Path, student: str, systems: list[str], caption: str = ""
) -> ExperimentConfig:
    """Fig. 4: the comparison with another student (the teacher stays); returns the run's config."""
    from mlas_lora.experiments.run import run_experiment

    sub = _sub_config(config, folder / "run", {"systems": systems, "models": {"student": student}})
    run_experiment(sub, report_dir=folder)
    what = f"the Table 1 comparison with student {student} under teacher {config.models.teacher} (Fig. 4)"
    (folder / "family.md").write_text(
        f"# family\n\n{what}: table.test.*.md; {caption or 'the config as it is'}.\n"
    )
    return sub


def _write_md(path: Path, rows: list[list], caption: str, signed: bool = False) -> None:
    """The rows as a markdown table (numbers to 2 decimals, `signed`: with their sign), the caption
    under it."""
    number = "{:+.2f}" if signed else "{:.2f}"

    def cell(value) -> str:
        return "" if value is None else number.format(value) if isinstance(value, float) else str(value)

    lines = [f"| {' | '.join(map(str, rows[0]))} |", "|" + " --- |" * len(rows[0])]
    lines += [f"| {' | '.join(cell(v) for v in row)} |" for row in rows[1:]]
    path.write_text(f"# {path.stem}\n\n" + "\n".join(lines) + f"\n\n{caption}.\n")


def _write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line_plot(rows: list[list], out: Path, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, system in enumerate(rows[0][2:], start=2):
        points = [(r[0], r[i]) for r in rows[1:] if r[i] is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=system)
    ax.set_xscale("log", base=2)
    counts = [r[0] for r in rows[1:]]
    ax.set_xticks(counts, [str(k) for k in counts])  # 1, 2, 4, ... rather than 2^0, 2^1, 2^2
    ax.minorticks_off()
    ax.set_xlabel("training directions")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _heatmap(rows: list[list], out: Path) -> None:
    plt = _pyplot()
    labels, values = rows[0][1:], [r[1:] for r in rows[1:]]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(values) + 1.5))
    bound = max(1e-9, max(abs(v) for row in values for v in row))
    image = ax.imshow(values, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(values)), [r[0] for r in rows[1:]])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("MLAS-LoRA trained on")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="BLEU change vs zero-shot")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
