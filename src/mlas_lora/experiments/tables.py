"""Tables shaped like the paper's: systems x directions, Avg., trainable parameters, the best score
of each column in bold, and a dagger where the paired bootstrap against the baseline gives p < 0.05."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MISSING = "—"
DAGGER = "†"


def format_params(n: int | None) -> str:
    if n is None:
        return MISSING
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def significant_cells(comparisons: Sequence[Mapping], metric: str, split: str, alpha: float = 0.05) -> dict:
    """(system, direction) -> p-value of its bootstrap against the baseline, for this split and metric."""
    out = {}
    for row in comparisons:
        name = row["direction"]
        suffix = f" ({split})"
        if split != "test":
            if not name.endswith(suffix):
                continue
            name = name.removesuffix(suffix)
        elif name.endswith(")"):
            continue
        if row["metric"] == metric:
            out[(row["system_a"], name)] = row["p_value"]
    return out


def paper_table(
    records,
    metric: str,
    systems: Sequence[str],
    params: Mapping[str, int | None],
    comparisons: Sequence[Mapping],
    split: str,
    baseline: str | None,
    alpha: float = 0.05,
) -> tuple[str, list[list]]:
    """(Markdown, CSV rows) of one split and metric."""
    grid = {(r.system, r.direction): r.score for r in records if r.metric == metric}
    directions = list(dict.fromkeys(r.direction for r in records if r.metric == metric))
    rows = {s: [grid.get((s, d)) for d in directions] for s in systems}
    for scores in rows.values():
        scores.append(sum(scores) / len(scores) if scores and None not in scores else None)
    columns = [*directions, "Avg."]
    best = [max((v[i] for v in rows.values() if v[i] is not None), default=None) for i in range(len(columns))]
    p_values = significant_cells(comparisons, metric, split)
    header = ["System", *columns, "Params"]
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |"]
    csv_rows = [["system", *[c for d in directions for c in (d, f"{d} p")], "avg", "trainable_params"]]
    for system, scores in rows.items():
        cells = []
        for i, score in enumerate(scores):
            if score is None:
                cells.append(MISSING)
                continue
            cell = f"{score:.2f}"
            if i < len(directions) and p_values.get((system, directions[i]), 1.0) < alpha:
                cell += DAGGER
            cells.append(f"**{cell}**" if score == best[i] else cell)
        lines.append("| " + " | ".join([system, *cells, format_params(params.get(system))]) + " |")
        per_dir = [x for i, d in enumerate(directions) for x in (scores[i], p_values.get((system, d)))]
        csv_rows.append([system, *per_dir, scores[-1], params.get(system)])
    marks = f"{DAGGER}: paired bootstrap against {baseline}, p < {alpha}; " if baseline else ""
    lines += ["", f"{metric} on {split}; best of each column in bold; {marks}Params: trainable parameters."]
    return "\n".join(lines) + "\n", csv_rows


def choice_on_valid(valid, test, metric: str = "chrf") -> str:
    """Markdown: the systems ranked by their average `metric` on the validation split, the one chosen
    (the best there), and its test scores. Test never takes part in the choice."""

    def averages(records) -> dict[str, float]:
        by_system: dict[str, list[float]] = {}
        for r in records:
            if r.metric == metric:
                by_system.setdefault(r.system, []).append(r.score)
        return {s: sum(v) / len(v) for s, v in by_system.items()}

    ranked = sorted(averages(valid).items(), key=lambda kv: -kv[1])
    if not ranked:
        return ""
    tested = averages(test)
    lines = [
        f"Chosen on the validation split by average {metric}: **{ranked[0][0]}** "
        f"(test average {tested.get(ranked[0][0], float('nan')):.2f}; test took no part in the choice).",
        "",
        f"| rank | system | valid {metric} | test {metric} |",
        "| ---: | --- | ---: | ---: |",
    ]
    for i, (system, score) in enumerate(ranked, 1):
        test_score = f"{tested[system]:.2f}" if system in tested else MISSING
        lines.append(f"| {i} | {system} | {score:.2f} | {test_score} |")
    return "\n".join(lines) + "\n"
