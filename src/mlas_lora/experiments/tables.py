"""Tables shaped like the paper's: systems x directions, Avg., trainable parameters, the best score
of each column in bold, mean ± sd over training seeds, and ▲ / ▼ where the system is significantly
better / worse than the baseline (evaluation/seeds.py: stratified approximate randomization, Holm)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

MISSING = "—"
BETTER, WORSE = "▲", "▼"
"""Marks of a cell significantly better / worse than the baseline (Holm-corrected across directions)."""


def format_params(n: int | None) -> str:
    if n is None:
        return MISSING
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def significant_cells(comparisons: Sequence[Mapping], metric: str, split: str) -> dict:
    """(system, direction) -> (Holm-adjusted p-value, delta) against the baseline, for this split and
    metric (rows of `experiment.seed_significance`)."""
    return {
        (row["system_a"], row["direction"]): (row["p_holm"], row["delta"])
        for row in comparisons
        if row["metric"] == metric and row["split"] == split
    }


def mark(p_and_delta: tuple[float, float] | None, alpha: float = 0.05) -> str:
    """▲ or ▼ where the difference to the baseline is significant (p < alpha), else nothing."""
    if p_and_delta is None or p_and_delta[0] >= alpha or p_and_delta[1] == 0:
        return ""
    return BETTER if p_and_delta[1] > 0 else WORSE


def cell_text(mean: float, sd: float | None) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def paper_table(
    records,
    metric: str,
    systems: Sequence[str],
    params: Mapping[str, int | None],
    comparisons: Sequence[Mapping],
    split: str,
    baseline: str | None,
    alpha: float = 0.05,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> tuple[str, list[list]]:
    """(Markdown, CSV rows) of one split and metric. `groups` maps a row to the systems whose scores it
    averages (a system trained with several seeds: mean ± sd over them; the Avg. column is the mean
    and sd of each seed's average over directions); by default every system is its own row."""
    from mlas_lora.evaluation.seeds import mean_sd

    groups = groups or {s: [s] for s in systems}
    grid = {(r.system, r.direction): r.score for r in records if r.metric == metric}
    directions = list(dict.fromkeys(r.direction for r in records if r.metric == metric))
    rows: dict[str, list[tuple[float, float | None] | None]] = {}
    for row in groups:
        members = [m for m in groups[row] if all((m, d) in grid for d in directions)]
        if not members or not directions:
            rows[row] = [None] * (len(directions) + 1)
            continue
        per_seed = [[grid[(m, d)] for d in directions] for m in members]
        cells = [mean_sd([seed[i] for seed in per_seed]) for i in range(len(directions))]
        rows[row] = [*cells, mean_sd([sum(seed) / len(seed) for seed in per_seed])]
    columns = [*directions, "Avg."]
    best = [
        max((v[i][0] for v in rows.values() if v[i] is not None), default=None) for i in range(len(columns))
    ]
    p_values = significant_cells(comparisons, metric, split)
    seeds = {row: len(members) for row, members in groups.items()}
    header = ["System", *columns, "Params"]
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join(["---:"] * (len(header) - 1)) + " |"]
    csv_rows = [["system", "seeds", *[c for d in directions for c in (d, f"{d} sd", f"{d} p")], "avg", "avg sd",
                 "trainable_params"]]  # fmt: skip
    for system, scores in rows.items():
        cells = []
        for i, score in enumerate(scores):
            if score is None:
                cells.append(MISSING)
                continue
            cell = cell_text(*score)
            if i < len(directions):
                cell += mark(p_values.get((system, directions[i])), alpha)
            cells.append(f"**{cell}**" if score[0] == best[i] else cell)
        lines.append("| " + " | ".join([system, *cells, format_params(params.get(system))]) + " |")
        per_dir = [
            x
            for i, d in enumerate(directions)
            for x in (*(scores[i] or (None, None)), (p_values.get((system, d)) or (None,))[0])
        ]
        csv_rows.append([system, seeds[system], *per_dir, *(scores[-1] or (None, None)), params.get(system)])
    n_seeds = sorted(set(seeds.values()))
    marks = (
        f"{BETTER}/{WORSE}: significantly better / worse than {baseline} (paired approximate randomization "
        f"stratified by seed, Holm-corrected across the {len(directions)} directions, p < {alpha}); "
        if baseline
        else ""
    )
    spread = "mean ± sd over training seeds; " if max(n_seeds, default=1) > 1 else ""
    lines += [
        "",
        f"{metric} on {split}; {spread}best of each column in bold; {marks}Params: trainable parameters "
        "(prerequisite trainings included).",
    ]
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
