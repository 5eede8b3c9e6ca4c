"""`mlas-lora report`: experiment folders published as docs/results.md, docs/figures/*.png and the
README's result block, so that no published number is typed by hand or left behind by a later run.

Every table of results.md is the experiment's own table (experiment.write_tables) under the
provenance the experiment recorded (provenance.json: command, commit, date, budget, decoding), with
the seeds and segments read from its results. The README's text between RESULTS_START and
RESULTS_END is replaced by the headline of the first folder: the average over directions on test and
out-of-domain, mean ± sd over training seeds, and its figure; everything outside the markers is kept
byte for byte.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.report import read_results
from mlas_lora.experiments.experiment import SPLIT_ORDER, seed_groups
from mlas_lora.experiments.provenance import read_provenance
from mlas_lora.experiments.tables import MISSING, cell_text, format_params, mark, significant_cells
from mlas_lora.stage_files import read_small_json, write_text_atomic

RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
FIGURE_BYTES = 100_000
"""Committed figures stay under this size (PNG at 100 dpi; a larger copied one is scaled down)."""
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++", "meteor": "METEOR", "comet": "COMET"}
SPLIT_NAMES = {"test": "test", "ood": "OOD", "valid": "valid"}
HEADLINE = (("test", "bleu"), ("test", "chrf"), ("ood", "bleu"), ("ood", "chrf"))
NOT_RECORDED = "not recorded (the experiment ran before provenance.json was written; rerun it to record)"


@dataclass
class Experiment:
    """What an experiment folder holds, read once."""

    folder: Path
    label: str
    results: dict[str, list]  # split -> ResultRecord, in SPLIT_ORDER
    groups: dict[str, list[str]]  # row -> its seeds' system names
    params: dict[str, int | None]
    comparisons: list[dict]  # significance.seeds.json
    provenance: dict | None

    @property
    def run(self) -> str:
        return self.folder.resolve().parent.parent.name


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def read_experiment(folder: Path, label: str) -> Experiment:
    """An experiment folder (RUN/experiments/NAME): a table experiment's results/, or an analysis's
    NAME.md (pairs, transfer); a clear error where it holds neither."""
    paths = sorted(Path(folder).glob("results/*.json"), key=lambda p: (_split_rank(p.stem), p.stem))
    if not paths and not (Path(folder) / f"{Path(folder).name}.md").is_file():
        raise MlasLoraError(
            f"{folder}: no results/*.json nor {Path(folder).name}.md; give an experiment folder "
            "RUN/experiments/NAME written by `mlas-lora experiment`"
        )
    results = {p.stem: read_results(p) for p in paths}
    names = list(dict.fromkeys(r.system for records in results.values() for r in records))
    comparisons = read_small_json(Path(folder) / "significance.seeds.json")
    return Experiment(
        Path(folder), label, results, seed_groups(names), read_params(Path(folder)),
        comparisons if isinstance(comparisons, list) else [], read_provenance(Path(folder)),
    )  # fmt: skip


def read_params(folder: Path) -> dict[str, int | None]:
    """Row -> trainable parameters, from the trainable_params column of the experiment's table CSVs."""
    import csv

    for path in sorted(folder.glob("table.*.csv")):
        with open(path, newline="", encoding="utf-8") as handle:
            header, *rows = list(csv.reader(handle)) or [[]]
        if "trainable_params" in header:
            at = header.index("trainable_params")
            return {row[0]: int(row[at]) if row[at] else None for row in rows}
    return {}


def labels(folders: list[Path]) -> list[str]:
    """Each folder's name in docs/figures: the experiment's name, or RUN-NAME where two share one."""
    names = Counter(Path(f).name for f in folders)
    out = [Path(f).name if names[Path(f).name] == 1 else f"{Path(f).resolve().parent.parent.name}-{Path(f).name}"
           for f in folders]  # fmt: skip
    if len(set(out)) < len(out):
        raise MlasLoraError(f"an experiment folder is given twice: {', '.join(map(str, folders))}")
    return out


# --- what produced the numbers ------------------------------------------------------------------


def seeds_words(groups: dict[str, list[str]]) -> str:
    """`2 seeds per system (zero-shot 1)`: the common count, and the rows with another."""
    counts = {row: len(members) for row, members in groups.items()}
    common = max(Counter(counts.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]  # a tie: the most seeds
    others = ", ".join(f"{row} {n}" for row, n in counts.items() if n != common)
    return f"{common} seed{'s' if common > 1 else ''} per system" + (f" ({others})" if others else "")


def segments_words(records) -> str:
    """`300 × 4 directions`, or each direction's count where they differ."""
    sizes = dict.fromkeys(r.direction for r in records)
    sizes.update({r.direction: r.n_segments for r in records})
    if len(set(sizes.values())) == 1:
        return f"{next(iter(sizes.values()))} × {len(sizes)} directions"
    return ", ".join(f"{d} {n}" for d, n in sizes.items())


def _date(exp: Experiment) -> str:
    if exp.provenance:
        return exp.provenance["finished"][:10]
    made = [*exp.folder.glob("results/*.json"), *exp.folder.glob(f"{exp.folder.name}.md")]
    newest = max(p.stat().st_mtime for p in made)
    return "results files of " + time.strftime("%Y-%m-%d", time.localtime(newest))


def _commit(prov: dict | None, short: bool = False) -> str:
    if not prov or not prov.get("commit"):
        return "not recorded" if not prov else "not a git tree"
    commit = prov["commit"][:7] if short else prov["commit"]
    return f"`{commit}`" + (" (uncommitted changes)" if prov.get("dirty") else "")


def _budget(prov: dict | None) -> str:
    if not prov:
        return "not recorded"
    return f"`{prov['budget']}`" if prov.get("budget") else "none (the config's own settings)"


def source_line(exp: Experiment, split: str) -> str:
    """One line under each table: everything that produced it."""
    prov = exp.provenance or {}
    command = f"`{prov['command']}`" if prov.get("command") else "command not recorded"
    decoding = prov.get("generation", {}).get("decoding", "not recorded")
    return (
        f"Source: {command}; commit {_commit(exp.provenance, short=True)}; {_date(exp)}; budget "
        f"{_budget(exp.provenance)}; {seeds_words(exp.groups)}; {split} segments "
        f"{segments_words(exp.results[split])}; decoding {decoding}."
    )


def provenance_table(exp: Experiment) -> str:
    """The experiment's provenance as a two-column Markdown table."""
    prov = exp.provenance
    hashes = sorted({r.config_hash for records in exp.results.values() for r in records})
    rows = [
        ("Command", f"`{prov['command']}`" if prov and prov.get("command") else
         ("called from Python, not the command line" if prov else NOT_RECORDED)),
        ("Commit", _commit(prov)),
        ("Date", f"{prov['started']} to {prov['finished']}" if prov else _date(exp)),
        ("Budget", _budget(prov)),
    ]  # fmt: skip
    if exp.results:
        segments = "; ".join(f"{s}: {segments_words(r)}" for s, r in exp.results.items())
        rows += [("Seeds", seeds_words(exp.groups)), ("Segments per direction", segments)]
    if prov:
        data = prov["data"]
        sizes = ", ".join(f"{k.removesuffix('_per_direction')} {'all' if v is None else v}"
                          for k, v in data.items() if k != "directions")  # fmt: skip
        models = prov["models"]
        rows += [
            ("Data", f"directions {', '.join(data['directions'])}; per direction: {sizes}"),
            ("Decoding", prov["generation"]["decoding"]),
            (
                "Models",
                f"teacher `{models['teacher']}`, student `{models['student']}`, dtype {models['dtype']}",
            ),
            ("Versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v)),
        ]
    if hashes:
        rows.append(("Config hash (results)", ", ".join(f"`{h}`" for h in hashes)))
    rows.append(("Folder", f"`{exp.folder}`"))
    return "| | |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


# --- tables -------------------------------------------------------------------------------------


def _baseline(exp: Experiment) -> str | None:
    return next((row["system_b"] for row in exp.comparisons), None)


def headline_table(exp: Experiment) -> str:
    """Per row: seeds, the average over directions (mean ± sd over seeds) of BLEU and chrF++ on test
    and OOD with the directions where it is significantly better / worse than the baseline, Params."""
    from mlas_lora.experiments.tables import paper_table

    columns = [(s, m) for s, m in HEADLINE if s in exp.results] or [
        (s, m) for s in exp.results for m in ("bleu", "chrf")
    ]
    names = [m for members in exp.groups.values() for m in members]
    cells: dict[str, list[str]] = {row: [] for row in exp.groups}
    for split, metric in columns:
        _, rows = paper_table(
            exp.results[split], metric, names, exp.params, [], split, None, groups=exp.groups
        )
        at = rows[0].index("avg")
        marked = significant_cells(exp.comparisons, metric, split)
        directions = list(dict.fromkeys(r.direction for r in exp.results[split]))
        for row in rows[1:]:
            mean, sd = row[at], row[at + 1]
            note = _marks({d: mark(marked.get((row[0], d))) for d in directions})
            cells[row[0]].append(MISSING if mean is None else cell_text(mean, sd) + note)
    header = [
        "System",
        "Seeds",
        *(f"{SPLIT_NAMES.get(s, s)} {METRIC_NAMES[m]}" for s, m in columns),
        "Params",
    ]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row, members in exp.groups.items():
        params = format_params(exp.params.get(row))
        lines.append("| " + " | ".join([row, str(len(members)), *cells[row], params]) + " |")
    return "\n".join(lines) + "\n"


def _marks(by_direction: dict[str, str]) -> str:
    """` (▼ all 4)`, ` (▲ en-de)`: the directions where a row is significantly better / worse."""
    found = {d: m for d, m in by_direction.items() if m}
    if not found:
        return ""
    if len(found) == len(by_direction) > 1 and len(set(found.values())) == 1:
        return f" ({next(iter(found.values()))} all {len(found)})"
    return " (" + ", ".join(f"{m} {d}" for d, m in found.items()) + ")"


def headline_caption(exp: Experiment, results_link: str) -> str:
    prov = exp.provenance
    segments = ", ".join(f"{SPLIT_NAMES.get(s, s)} {segments_words(exp.results[s])}" for s in exp.results)
    baseline = _baseline(exp)
    marks = (
        f" ▲ / ▼: significantly better / worse than {baseline} in the directions named (paired approximate "
        "randomization stratified by seed, Holm-corrected across directions, p < 0.05)."
        if baseline
        else ""
    )
    return (
        f"**Current result** ({_date(exp)}; experiment `{exp.folder.name}` of run `{exp.run}`: "
        f"{seeds_words(exp.groups)}, segments per split {segments}, budget {_budget(prov)}, commit "
        f"{_commit(prov, short=True)}; all tables in [{results_link}]({results_link})). Average over "
        f"directions, mean ± sd over training seeds.{marks}\n"
    )


def experiment_tables(exp: Experiment) -> list[str]:
    """Each split's tables (the experiment's table.{split}.{metric}.md), each with its source line."""
    from mlas_lora.experiments.run import SPLIT_TITLES

    order = list(METRIC_NAMES)
    out = []
    for split, records in exp.results.items():
        out.append(f"### {SPLIT_TITLES.get(split, split)}\n")
        metrics = sorted({r.metric for r in records}, key=lambda m: (order.index(m) if m in order else 9, m))
        for metric in metrics:
            table = exp.folder / f"table.{split}.{metric}.md"
            body = table.read_text(encoding="utf-8") if table.is_file() else _table(exp, split, metric)
            out.append(
                f"#### {METRIC_NAMES.get(metric, metric)} ({split})\n\n{body}\n{source_line(exp, split)}\n"
            )
    if (choice := exp.folder / "choice.md").is_file():
        out.append(f"### Chosen on the validation split\n\n{choice.read_text(encoding='utf-8')}")
    return out


def _table(exp: Experiment, split: str, metric: str) -> str:
    """A table the experiment did not write (an older folder), made as write_tables makes it."""
    from mlas_lora.experiments.tables import paper_table

    names = [m for members in exp.groups.values() for m in members]
    return paper_table(exp.results[split], metric, names, exp.params, exp.comparisons, split,
                       _baseline(exp), groups=exp.groups)[0]  # fmt: skip


# --- figures ------------------------------------------------------------------------------------


def small_png(source: Path, target: Path, limit: int = FIGURE_BYTES) -> Path:
    """Copy a PNG, scaled down (Pillow, which matplotlib brings) until it is under `limit` bytes."""
    import io

    from PIL import Image

    data = source.read_bytes()
    if len(data) > limit:
        image = Image.open(io.BytesIO(data))
        for _ in range(8):
            scale = 0.9 * (limit / len(data)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
            data = buffer.getvalue()
            if len(data) <= limit:
                break
    if not (target.is_file() and target.read_bytes() == data):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


def experiment_figures(exp: Experiment, figures: Path, seen: dict) -> tuple[Path | None, list[Path]]:
    """(the headline figure, redrawn from the results at 100 dpi, or an analysis's NAME.png; the
    folder's other figures) in `figures`, copied small and named after the experiment's label. A
    figure another experiment of this report has already copied (`seen`: bytes -> copy; two
    experiments of one run share its layer relevance) is that copy."""
    from mlas_lora.experiments.plots import seeds_plot

    figures.mkdir(parents=True, exist_ok=True)
    own = exp.folder / f"{exp.folder.name}.png"  # the seeds' headline, or an analysis's figure
    if exp.results:
        headline = seeds_plot(exp.folder, exp.groups, figures / f"{exp.label}.png", dpi=100)
    else:
        headline = small_png(own, figures / f"{exp.label}.png") if own.is_file() else None
    others = [p for p in sorted(exp.folder.glob("*.png")) if p != own]
    copies = []
    for path in [*others, *sorted(exp.folder.glob("figures/*.png"))]:
        data = path.read_bytes()
        if data not in seen:
            seen[data] = small_png(path, figures / f"{exp.label}.{path.stem}.png")
        copies.append(seen[data])
    return headline, copies


# --- the documents ------------------------------------------------------------------------------


def _link(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def results_markdown(experiments: list[Experiment], figures: dict, out: Path, command: str | None) -> str:
    how = f"```bash\n{command}\n```\n" if command else "`mlas-lora report` (publish.publish)\n"
    parts = [
        "# Results\n",
        f"Generated from the experiment folders below by\n\n{how}",
        "Do not edit by hand: rerun the command after an experiment. It rewrites this file, the figures "
        "in `figures/` and the README's result block. Each table names the command, commit, date, budget, "
        "seeds, segments and decoding that produced it (the experiment's `provenance.json`).\n",
    ]
    for exp in experiments:
        headline, others = figures[exp.label]
        parts.append(f"## {exp.label}: experiment `{exp.folder.name}` of run `{exp.run}`\n")
        if exp.results:
            parts.append(f"### Headline: average over directions\n\n{headline_table(exp)}")
        if headline:
            parts.append(f"![{exp.label}]({_link(headline, out)})\n")
        parts.append(f"### Provenance\n\n{provenance_table(exp)}")
        if (analysis := exp.folder / f"{exp.folder.name}.md").is_file():  # pairs, transfer, family
            parts.append(f"### {analysis.name}\n\n{analysis.read_text(encoding='utf-8')}")
        parts += experiment_tables(exp)
        if others:
            shown = [f"![{p.stem.rsplit('.', 1)[-1]}]({_link(p, out)})\n\n" for p in others]
            parts.append("### Other figures\n\n" + "".join(shown).rstrip("\n") + "\n")
    return "\n".join(part for part in parts if part).rstrip("\n") + "\n"


def readme_block(exp: Experiment, headline: Path | None, results: Path, readme: Path) -> str:
    """The README's text between the markers: the dated headline table and its figure."""
    block = [
        f"<!-- generated by `mlas-lora report` from {exp.folder}: rerun it, do not edit up to results:end -->",
        headline_caption(exp, _link(results, readme.parent)),
        headline_table(exp),
    ]
    if headline is not None:
        block.append(f"![{exp.label}]({_link(headline, readme.parent)})\n")
    return "\n".join(block)


def replace_results_block(text: str, block: str, where: str = "README") -> str:
    """`text` with what lies between RESULTS_START and RESULTS_END replaced by `block`; the markers and
    everything outside them kept byte for byte. A missing, repeated or reversed marker is an error."""
    starts, ends = text.count(RESULTS_START), text.count(RESULTS_END)
    if starts != 1 or ends != 1 or text.index(RESULTS_START) > text.index(RESULTS_END):
        found = f"found {starts} `{RESULTS_START}` and {ends} `{RESULTS_END}`"
        raise MlasLoraError(
            f"{where}: no results block ({found}); put these two lines, each on its own line and in this "
            f"order, where the current result goes, then rerun:\n{RESULTS_START}\n{RESULTS_END}"
        )
    head, rest = text.split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    return f"{head}{RESULTS_START}\n{block.rstrip(chr(10))}\n{RESULTS_END}{tail}"


def publish(
    folders: list[Path], out: Path, readme: Path | None = None, command: str | None = None
) -> list[Path]:
    """Write OUT/results.md and OUT/figures/*.png from the experiment folders and, given `readme`,
    replace its results block by the first folder's headline; returns the files written. Every
    folder and the README's markers are checked before anything is written."""
    if not folders:
        raise MlasLoraError("give at least one experiment folder (RUN/experiments/NAME)")
    experiments = [read_experiment(Path(f), label) for f, label in zip(folders, labels(folders), strict=True)]
    readme_text = None
    if readme is not None:
        if not experiments[0].results:
            raise MlasLoraError(
                f"{folders[0]}: an analysis has no headline table; give a table experiment first (--readme)"
            )
        readme_text = Path(readme).read_bytes().decode("utf-8")
        replace_results_block(readme_text, "", str(readme))  # the markers, before anything is written
    out = Path(out)
    seen: dict[bytes, Path] = {}
    figures = {exp.label: experiment_figures(exp, out / "figures", seen) for exp in experiments}
    results = write_text_atomic(out / "results.md", results_markdown(experiments, figures, out, command))
    drawn = (p for headline, others in figures.values() for p in (headline, *others) if p is not None)
    written = [results, *dict.fromkeys(drawn)]
    if readme is not None:
        first = experiments[0]
        block = readme_block(first, figures[first.label][0], results, Path(readme))
        written.append(write_text_atomic(readme, replace_results_block(readme_text, block, str(readme))))
    return written
