"""The experiment's figures (matplotlib, PNG): layer relevance (Eq. 1) per pair with the kept layers
marked, general / specific neuron counts per layer and pair (Sec. 3.1), BLEU against lambda (Fig. 5),
the seeds' headline, and every run's summary bars and training-loss curves (`run_figures`)."""

from __future__ import annotations

import io
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def relevance_plot(awareness_dir: Path, out: Path) -> Path:
    """R(l) of every pair against the teacher layer; kept layers marked, dropped ones shaded."""
    from safetensors.torch import load_file

    meta = json.loads((awareness_dir / "awareness.json").read_text())
    relevance = load_file(str(awareness_dir / "awareness.safetensors"))["relevance"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = list(range(relevance.shape[1]))
    for pair, values in zip(meta["pairs"], relevance.tolist(), strict=True):
        ax.plot(layers, values, label=pair, alpha=0.8)
    mean = relevance.mean(dim=0).tolist()
    kept = meta["selected_layers"]
    ax.scatter(kept, [mean[i] for i in kept], color="black", zorder=3, s=18, label="kept (mean)")
    for layer in (x for x in layers if x not in kept):
        ax.axvspan(layer - 0.5, layer + 0.5, color="grey", alpha=0.15, lw=0)
    ax.set_xlabel("teacher layer (shaded: dropped)")
    ax.set_ylabel(f"Eq. (1) relevance, reading `{meta.get('relevance_reading', 'all')}`")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def neuron_plot(classes_dir: Path, out: Path) -> Path:
    """Stacked bars per kept teacher layer: general neurons, then each pair's specific ones."""
    meta = json.loads((classes_dir / "classes.json").read_text())
    per_layer, pairs = meta["summary"]["per_layer"], meta["pairs"]
    layers = sorted(per_layer, key=int)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0] * len(layers)
    for name in ["general", *pairs]:
        values = [
            per_layer[x]["general"] if name == "general" else per_layer[x]["specific"][name] for x in layers
        ]
        ax.bar(layers, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xlabel("teacher layer (kept by Eq. 1)")
    ax.set_ylabel("neurons")
    ax.set_title(f"lambda {meta['lambda']}, Phi normalised by `{meta.get('normalize', 'none')}`", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def lambda_plot(
    systems, folder: Path, out: Path, direction: str = "en-de", split: str = "test"
) -> Path | None:
    """BLEU of `direction` (or the average, without it) against each system's resolved lambda."""
    from mlas_lora.awareness.classify import resolve_lambda
    from mlas_lora.evaluation.report import read_results

    path = folder / "results" / f"{split}.json"
    if not path.is_file():
        return None
    records = [r for r in read_results(path) if r.metric == "bleu"]
    points = []
    for system in systems:
        scores = {r.direction: r.score for r in records if r.system == system.name}
        if not scores:
            continue
        score = scores.get(direction, sum(scores.values()) / len(scores))
        lam = resolve_lambda(system.config.awareness.lam, len(system.config.data.trained_directions))
        points.append((lam, score, system.config.awareness.lam == "auto"))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = sorted((x, y) for x, y, auto in points if not auto)
    ax.plot([x for x, _ in fixed], [y for _, y in fixed], marker="o", label="lambda")
    for x, y, auto in points:
        if auto:
            ax.scatter([x], [y], marker="*", s=120, color="red", zorder=3, label=f"auto ({x:.3f})")
    scope = direction if any(r.direction == direction for r in records) else "average"
    ax.set_xlabel("lambda")
    ax.set_ylabel(f"BLEU ({scope}, {split})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def seeds_plot(
    folder: Path, groups: dict[str, list[str]], out: Path, splits=("test", "ood"), dpi: int = 120
) -> Path | None:
    """The headline figure: per system, the average over directions (BLEU and chrF++), its mean over
    training seeds with a bar of ± 1 sd (none for one seed), each split side by side."""
    from mlas_lora.evaluation.report import read_results
    from mlas_lora.evaluation.seeds import mean_sd

    paths = {s: folder / "results" / f"{s}.json" for s in splits}
    results = {s: read_results(path) for s, path in paths.items() if path.is_file()}
    if not results:
        return None
    plt = _pyplot()
    metrics = ("bleu", "chrf")
    fig, axes = plt.subplots(1, len(metrics), figsize=(11, 0.45 * len(groups) + 1.6), sharey=True)
    height = 0.8 / len(results)
    for ax, metric in zip(axes, metrics, strict=True):
        for j, (split, records) in enumerate(results.items()):
            grid = {(r.system, r.direction): r.score for r in records if r.metric == metric}
            directions = sorted({d for _, d in grid})
            means, sds = [], []
            for members in groups.values():
                seeds = [[grid.get((m, d)) for d in directions] for m in members]
                averages = [sum(s) / len(s) for s in seeds if None not in s and s]
                mean, sd = mean_sd(averages) if averages else (float("nan"), None)
                means.append(mean)
                sds.append(sd or 0.0)
            ys = [i + j * height for i in range(len(groups))]
            ax.barh(ys, means, height=height, xerr=sds, capsize=3, label=split, alpha=0.85)
            for y, mean in zip(ys, means, strict=True):
                ax.text(mean, y, f" {mean:.2f}", va="center", fontsize=7)
        ax.set_yticks([i + height * (len(results) - 1) / 2 for i in range(len(groups))])
        ax.set_yticklabels([f"{row} ({len(m)})" for row, m in groups.items()])
        ax.invert_yaxis()
        ax.set_xlabel(f"{'BLEU' if metric == 'bleu' else 'chrF++'}, average over directions")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("mean over training seeds (in brackets), bars ± 1 sd", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def save_if_changed(fig, out: Path, dpi: int = 100) -> Path:
    """Write the figure as PNG only where its bytes differ from the file there (Agg's PNGs carry no
    date): a rerun of unchanged results leaves the file, and its time stamp, as they were."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")  # the legend beside the panels
    _pyplot().close(fig)
    data = buffer.getvalue()
    out = Path(out)
    if not (out.is_file() and out.read_bytes() == data):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return out


def summary_plot(records: dict[str, list], systems: list[str], out: Path) -> Path | None:
    """BLEU and chrF++ of every system per direction and on average over them (the report's tables as
    bars): one row of panels per test split (test and OOD, else what there is)."""
    splits = [s for s in ("test", "ood") if records.get(s)] or [s for s, rows in records.items() if rows]
    metrics = [m for m in ("bleu", "chrf") if any(r.metric == m for s in splits for r in records[s])]
    if not splits or not metrics:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(splits), len(metrics), figsize=(4.8 * len(metrics), 3.0 * len(splits)),
                             squeeze=False)  # fmt: skip
    for row, split in enumerate(splits):
        for col, metric in enumerate(metrics):
            grid = {(r.system, r.direction): r.score for r in records[split] if r.metric == metric}
            directions = list(dict.fromkeys(d for _, d in grid))
            shown = [s for s in systems if any((s, d) in grid for d in directions)]
            width = 0.8 / max(len(shown), 1)
            ax = axes[row][col]
            for i, system in enumerate(shown):
                scores = [grid.get((system, d), float("nan")) for d in directions]
                average = sum(scores) / len(scores)  # nan where a direction is missing
                xs = [k + (i - (len(shown) - 1) / 2) * width for k in range(len(directions) + 1)]
                ax.bar(xs, [*scores, average], width=width, label=system)
            ax.set_xticks(range(len(directions) + 1), [*directions, "Avg."], fontsize=8)
            ax.set_ylabel(f"{'BLEU' if metric == 'bleu' else 'chrF++'} ({split})", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_if_changed(fig, out)


def loss_plot(logs: dict[str, list[dict]], out: Path) -> Path | None:
    """The training loss at every optimizer step of each trained system (train_log.json's history),
    with its running mean over a tenth of the steps where there are more than 20."""
    logs = {name: history for name, history in logs.items() if history}
    if not logs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for name, history in logs.items():
        steps, losses = [r["step"] for r in history], [r["loss"] for r in history]
        if len(losses) <= 20:
            ax.plot(steps, losses, marker=".", label=name)
            continue
        window = max(2, len(losses) // 10)
        (line,) = ax.plot(steps, losses, alpha=0.3, linewidth=0.8)
        starts = [max(0, i - window + 1) for i in range(len(losses))]
        means = [sum(losses[a : i + 1]) / (i + 1 - a) for i, a in enumerate(starts)]
        ax.plot(steps, means, color=line.get_color(), label=f"{name} (running mean of {window})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_if_changed(fig, out)


def training_logs(systems) -> dict[str, list[dict]]:
    """Each trained system's loss history, from the train_log.json of its training folder; systems
    that share one training (same key under two names, `pipeline.training_folder`) are one line."""
    from mlas_lora.experiments.pipeline import training_folder
    from mlas_lora.stage_files import read_small_json

    by_folder: dict[Path, list[str]] = {}
    for system in systems:
        if system.method.trains:
            by_folder.setdefault(training_folder(system)[0], []).append(system.name)
    logs = {}
    for folder, names in by_folder.items():
        log = read_small_json(folder / "train_log.json")  # None: not trained yet, or cut by a kill
        history = log.get("history") if isinstance(log, dict) else None
        if isinstance(history, list):
            logs[" = ".join(names)] = [r for r in history if isinstance(r, dict) and "loss" in r]
    return logs


def run_figures(report_dir: Path, records: dict[str, list], systems) -> str:
    """figures/summary.png and figures/loss.png of a run's report; the report's section naming them."""
    folder = Path(report_dir) / "figures"
    drawn = [
        (summary_plot(records, [s.name for s in systems], folder / "summary.png"),
         "BLEU and chrF++ of each system per direction and averaged"),
        (loss_plot(training_logs(systems), folder / "loss.png"),
         "training loss per step of each trained system (train_log.json)"),
    ]  # fmt: skip
    lines = [f"- `{path}`: {what}" for path, what in drawn if path is not None]
    return "## Figures\n\n" + "\n".join(lines) + "\n" if lines else ""
