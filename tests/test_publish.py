"""`mlas-lora report` (experiments/publish.py): docs/results.md with every table's provenance, small
figures, the README's block between the markers; and the figures `mlas-lora run` draws."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import pytest

from mlas_lora.cli import main
from mlas_lora.config import config_from_dict, save_yaml
from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.report import ResultRecord, write_results
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.experiment import seed_groups
from mlas_lora.experiments.provenance import code_commit, experiment_provenance, write_provenance
from mlas_lora.experiments.publish import RESULTS_END, RESULTS_START, publish, replace_results_block
from mlas_lora.experiments.tables import paper_table
from test_pipeline import tiny_config

COMMAND = "mlas-lora experiment verdict configs/x.yaml --budget cpu --seeds 2"
SCORES = {  # (system, direction) -> (test BLEU, OOD BLEU); chrF++ is BLEU + 20
    ("zero-shot", "en-de"): (5.0, 30.0), ("zero-shot", "en-fi"): (7.0, 32.0),
    ("lora", "en-de"): (10.0, 40.0), ("lora", "en-fi"): (20.0, 42.0),
    ("lora.seed1", "en-de"): (12.0, 41.0), ("lora.seed1", "en-fi"): (22.0, 43.0),
}  # fmt: skip


def synthetic_experiment(run: Path, name: str = "verdict") -> Path:
    """RUN/experiments/NAME as `mlas-lora experiment` leaves it: results, tables, provenance."""
    folder = run / "experiments" / name
    for split, at in (("test", 0), ("ood", 1)):
        records = [
            ResultRecord(
                system, direction, metric, score[at] + (20 if metric == "chrf" else 0), "sig", 3, "h1"
            )
            for (system, direction), score in SCORES.items()
            for metric in ("bleu", "chrf")
        ]
        write_results(records, folder / "results" / f"{split}.json")
        names = list(dict.fromkeys(s for s, _ in SCORES))
        for metric in ("bleu", "chrf"):
            md, rows = paper_table(records, metric, names, {"zero-shot": 0, "lora": 1234}, [], split, None,
                                   groups=seed_groups(names))  # fmt: skip
            (folder / f"table.{split}.{metric}.md").write_text(md)
            (folder / f"table.{split}.{metric}.csv").write_text(
                "\n".join(",".join("" if c is None else str(c) for c in row) for row in rows) + "\n"
            )
    config = config_from_dict(ExperimentConfig, {"name": "x", "data": {"test_per_direction": 3}})
    provenance = experiment_provenance(config, name, "cpu", 2, COMMAND, "2026-12-01T10:00:00")
    write_provenance(folder, {**provenance, "finished": "2026-12-01T11:00:00"})
    return folder


def noisy_png(path: Path, side: int = 400) -> Path:
    """A PNG far over the size limit (random pixels do not compress)."""
    from PIL import Image

    rng = random.Random(0)
    Image.frombytes("RGB", (side, side), bytes(rng.randrange(256) for _ in range(3 * side * side))).save(path)
    return path


def test_results_md_carries_every_tables_provenance_and_small_figures(tmp_path):
    folder = synthetic_experiment(tmp_path / "run")
    assert noisy_png(folder / "layer_relevance.png").stat().st_size > 300_000
    written = publish([folder], tmp_path / "docs", command="mlas-lora report X --out docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    commit, dirty = code_commit()
    for line in (
        "mlas-lora report X --out docs",
        f"| Command | `{COMMAND}` |",
        f"| Commit | `{commit}`" if commit else "| Commit | not a git tree |",
        "| Date | 2026-12-01T10:00:00 to 2026-12-01T11:00:00 |",
        "| Budget | `cpu` |",
        "| Seeds | 2 seeds per system (zero-shot 1) |",
        "| Segments per direction | test: 3 × 2 directions; ood: 3 × 2 directions |",
        "| Decoding | greedy, max_new_tokens 256 (at most 2.0 x source tokens + 8), batch 64",
        "per direction: train all, seed 1000, valid 0, test 3, ood 0",
    ):
        assert line in text, line
    # the headline: averages over directions, mean ± sd over the two seeds of lora
    assert "| System | Seeds | test BLEU | test chrF++ | OOD BLEU | OOD chrF++ | Params |" in text
    assert "| lora | 2 | 16.00 ± 1.41 | 36.00 ± 1.41 | 41.50 ± 0.71 | 61.50 ± 0.71 | 1,234 |" in text
    assert "| zero-shot | 1 | 6.00 | 26.00 | 31.00 | 51.00 | 0 |" in text
    # each of the four tables is followed by its source line
    source = f"Source: `{COMMAND}`; commit "
    assert text.count(source) == 4 and text.count("| System | en-de | en-fi | Avg. | Params |") == 4
    assert (
        "; 2026-12-01; budget `cpu`; 2 seeds per system (zero-shot 1); test segments 3 × 2 directions; "
        in text
    )
    assert "; decoding greedy, max_new_tokens 256" in text
    figures = tmp_path / "docs" / "figures"
    assert "![verdict](figures/verdict.png)" in text
    assert "![layer_relevance](figures/verdict.layer_relevance.png)" in text
    for png in (figures / "verdict.png", figures / "verdict.layer_relevance.png"):
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 100_000, png


def test_an_experiment_without_provenance_says_what_is_not_recorded(tmp_path):
    folder = synthetic_experiment(tmp_path / "run")
    (folder / "provenance.json").unlink()
    publish([folder], tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| Command | not recorded (the experiment ran before provenance.json was written" in text
    assert "Source: command not recorded; commit not recorded; results files of 20" in text
    assert "| Config hash (results) | `h1` |" in text


README = (
    "# Title\r\n\r\nSome text: ü, ▲.\n\n"
    f"{RESULTS_START}\nthe old table\n{RESULTS_END}\n"
    "\n## After\n\nmore text, no final newline"
)


def test_the_readme_block_is_replaced_and_the_rest_kept_byte_for_byte(tmp_path):
    folder = synthetic_experiment(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_bytes(README.encode())
    head, tail = README.split(RESULTS_START)[0], README.split(RESULTS_END)[1]
    assert main(["report", str(folder), "--out", str(tmp_path / "docs"), "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    assert text.startswith(head + RESULTS_START + "\n") and text.endswith("\n" + RESULTS_END + tail)
    block = text[len(head) : -len(tail)]
    assert "the old table" not in block
    assert "**Current result** (2026-12-01; experiment `verdict` of run `run`: 2 seeds per system" in block
    assert "budget `cpu`" in block and "[docs/results.md](docs/results.md)" in block
    assert "| lora | 2 | 16.00 ± 1.41 | 36.00 ± 1.41 | 41.50 ± 0.71 | 61.50 ± 0.71 | 1,234 |" in block
    assert "![verdict](docs/figures/verdict.png)" in block
    assert main(["report", str(folder), "--out", str(tmp_path / "docs"), "--readme", str(readme)]) == 0
    assert readme.read_bytes().decode() == text  # a second report of the same results changes nothing
    results = (tmp_path / "docs" / "results.md").read_text()
    expected = shlex.join(
        ["mlas-lora", "report", str(folder), "--out", str(tmp_path / "docs"), "--readme", str(readme)]
    )
    assert f"```bash\n{expected}\n```" in results


@pytest.mark.parametrize(
    "text",
    ["# no markers\n", f"{RESULTS_START}\nonly the start\n", f"{RESULTS_END}\nreversed\n{RESULTS_START}\n",
     f"{RESULTS_START}\n{RESULTS_END}\n{RESULTS_START}\n{RESULTS_END}\n"],
)  # fmt: skip
def test_a_readme_without_its_markers_is_a_clear_error_and_nothing_is_written(tmp_path, capsys, text):
    folder = synthetic_experiment(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert main(["report", str(folder), "--out", str(tmp_path / "docs"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert f"{readme}: no results block" in err and f"\n{RESULTS_START}\n{RESULTS_END}" in err
    assert readme.read_text() == text and not (tmp_path / "docs").exists()


def test_an_analysis_folder_is_published_with_its_table_and_figure(tmp_path):
    verdict = synthetic_experiment(tmp_path / "run")
    pairs = tmp_path / "run" / "experiments" / "pairs"
    pairs.mkdir()
    (pairs / "pairs.md").write_text("| pairs | en-de BLEU |\n| ---: | ---: |\n| 1 | 9.50 |\n")
    noisy_png(pairs / "pairs.png", side=50)
    publish([verdict, pairs], tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "## pairs: experiment `pairs` of run `run`" in text and "| 1 | 9.50 |" in text
    assert "![pairs](figures/pairs.png)" in text and (tmp_path / "docs" / "figures" / "pairs.png").is_file()
    with pytest.raises(MlasLoraError, match="an analysis has no headline table"):
        publish([pairs, verdict], tmp_path / "docs", tmp_path / "README.md")


def test_a_figure_two_experiments_share_is_copied_once(tmp_path):
    first, second = (synthetic_experiment(tmp_path / "run", name) for name in ("verdict", "unseen"))
    for folder in (first, second):
        noisy_png(folder / "neurons.png", side=40)
    written = publish([first, second], tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert text.count("![neurons](figures/verdict.neurons.png)") == 2
    assert not (tmp_path / "docs" / "figures" / "unseen.neurons.png").exists()
    assert len(written) == len(set(written)) == 4  # results.md, two headlines, one copy


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlasLoraError, match="no results/\\*.json nor empty.md; give an experiment folder"):
        publish([tmp_path / "empty"], tmp_path / "docs")
    with pytest.raises(MlasLoraError, match="no results block"):
        replace_results_block("text", "block")


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    config = tiny_config(root)
    save_yaml(config, root / "tiny.yaml")
    return root / "tiny.yaml", Path(config.output_dir)


@pytest.mark.usefixtures("one_thread")
def test_run_draws_the_summary_and_the_loss_curve_and_names_them(tiny_yaml, capsys):
    path, run = tiny_yaml
    assert main(["run", str(path), "systems=[zero-shot,lora]"]) == 0
    out = capsys.readouterr().out
    for name in ("summary.png", "loss.png"):
        png = run / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000
        assert f"`{png}`" in out and f"`{png}`" in (run / "report.md").read_text()
    stamp = (run / "figures" / "loss.png").stat().st_mtime_ns
    assert main(["run", str(path), "systems=[zero-shot,lora]"]) == 0  # unchanged results: files kept
    assert (run / "figures" / "loss.png").stat().st_mtime_ns == stamp


@pytest.mark.usefixtures("one_thread")
def test_experiment_records_provenance_and_report_prints_it(tiny_yaml, tmp_path):
    path, run = tiny_yaml
    argv = ["experiment", "pub", str(path), "--systems", "zero-shot,lora", "--seeds", "2"]
    assert main(argv) == 0
    prov = json.loads((run / "experiments" / "pub" / "provenance.json").read_text())
    assert prov["command"] == shlex.join(["mlas-lora", *argv])
    assert prov["experiment"] == "pub" and prov["budget"] is None and prov["seeds"] == 2
    assert prov["data"]["directions"] == ["en-de", "en-fi"] and prov["data"]["valid_per_direction"] == 2
    assert prov["generation"]["max_new_tokens"] == 4 and prov["generation"]["decoding"].startswith("greedy")
    assert prov["commit"] == code_commit()[0] and prov["config"]["name"] == "tiny"
    publish([run / "experiments" / "pub"], tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert (
        f"| Command | `{prov['command']}` |" in text
        and "| Budget | none (the config's own settings) |" in text
    )
    assert "| Seeds | 2 seeds per system (zero-shot 1) |" in text
    assert "test: 3 × 2 directions; valid: 2 × 2 directions" in text
    assert (tmp_path / "docs" / "figures" / "pub.png").is_file()
    assert (tmp_path / "docs" / "figures" / "pub.loss.png").is_file()  # the run's figures come along
