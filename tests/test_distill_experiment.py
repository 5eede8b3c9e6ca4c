"""`mlas-lora experiment distill` and the `monolingual` analysis on tiny models: the named systems,
both significance baselines, the costs, and the curve's sentences taken from unused training rows."""

import json
from dataclasses import replace

import pytest

from mlas_lora.experiments.distill_experiment import (
    DISTILL_SYSTEMS,
    distill_costs,
    monolingual_systems,
    run_monolingual,
)
from mlas_lora.experiments.experiment import experiment_config, experiment_systems, run_named_experiment
from test_pipeline import tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill-experiment")
    return root, tiny_config(root)


def test_the_distill_experiment_names_its_systems_and_baseline(tiny):
    _, config = tiny
    assert experiment_systems("distill", None) == list(DISTILL_SYSTEMS)
    assert {
        "lora-seqkd",
        "mlas-lora-seqkd",
        "lora-kd",
        "mlas-lora-kd",
        "mlas-lora-seqkd-kd",
        "teacher",
    } <= set(DISTILL_SYSTEMS)
    other = replace(config, evaluation=replace(config.evaluation, baseline_for_significance="mlas-lora"))
    seeded = experiment_config("distill", other, list(DISTILL_SYSTEMS), "cpu", seeds=3)
    assert seeded.evaluation.baseline_for_significance == "lora"
    names = [s if isinstance(s, str) else s["name"] for s in seeded.systems]
    assert "mlas-lora-seqkd-kd.seed2" in names and "teacher.seed1" not in names
    assert seeded.training.max_steps == 48  # the budget's


def test_distill_runs_with_seeds_and_writes_both_comparisons_and_costs(tiny):
    root, config = tiny
    systems = ["zero-shot", "lora", "mlas-lora", "lora-kd", "mlas-lora-seqkd"]
    folder = run_named_experiment("distill", config, systems, seeds=2)
    assert (folder / "table.test.bleu.md").is_file() and (
        folder / "vs-mlas-lora/table.test.bleu.md"
    ).is_file()
    against_lora = json.loads((folder / "significance.seeds.json").read_text())
    against_mlas = json.loads((folder / "vs-mlas-lora/significance.seeds.json").read_text())
    assert {r["system_b"] for r in against_lora} == {"lora"} and {r["system_b"] for r in against_mlas} == {
        "mlas-lora"
    }
    costs = (folder / "costs.md").read_text()
    for name in ("lora-kd", "lora-kd.seed1", "mlas-lora-seqkd", "mlas-lora-seqkd.seed1"):
        assert f"| {name} | " in costs
    assert "| lora | " not in costs
    run = root / "run"
    seqkd = json.loads((run / "train-mlas-lora-seqkd.seed1/targets.json").read_text())
    first = json.loads((run / "train-mlas-lora-seqkd/targets.json").read_text())
    assert seqkd["stages"] != first["stages"]  # another training seed reads other rows
    assert "## Teacher translations as targets" in (folder / "report.md").read_text()


def test_costs_are_ratios_to_the_undistilled_training(tmp_path, monkeypatch):
    import mlas_lora.experiments.pipeline as pipeline

    class System:
        def __init__(self, name):
            self.name, self.method = name, type("Method", (), {"trains": True})()

    seconds = {"lora": 10.0, "lora-kd": 25.0, "lora-seqkd": 12.0}
    for name, own in seconds.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "stage.json").write_text(json.dumps({"seconds": own}))
    (tmp_path / "lora-seqkd" / "targets.json").write_text(json.dumps({"teacher_seconds": 30.0}))
    monkeypatch.setattr(pipeline, "training_folder", lambda system: (tmp_path / system.name, "key"))
    text = distill_costs([System(n) for n in seconds])
    assert "| lora-kd | 25.0 | 2.50x | 0.0 | 0.00x |" in text
    assert "| lora-seqkd | 12.0 | 1.20x | 30.0 | 3.00x |" in text


def test_monolingual_curve_reads_unused_training_rows(tiny):
    root, config = tiny
    small = replace(config, data=replace(config.data, train_per_direction=8))
    folder = root / "run" / "experiments" / "monolingual"
    entries = monolingual_systems(small, folder, ["lora"], counts=(0, 3))
    assert entries[0] == "lora" and entries[1]["name"] == "lora-mono3"
    assert entries[1]["training"] == {"max_steps": 3}  # 2 steps x (16 + 2 x 3) / 16 rows, rounded up
    from mlas_lora.experiments.data import load_splits

    taken = load_splits(small.data, ("train",)).train
    for direction, path in entries[1]["data"]["monolingual"].items():
        lines = open(path, encoding="utf-8").read().splitlines()
        assert len(lines) == 3 and not set(lines) & {e.source for e in taken[direction]}
    run_monolingual(small, folder, systems=["lora"], counts=(0, 3))
    table = (folder / "monolingual.md").read_text()
    assert (
        "| sentences per direction | lora | lora gain |" in table and "| 0 | " in table and "| 3 | " in table
    )
    assert (folder / "monolingual.png").is_file()
    targets = json.loads((root / "run" / "train-lora-mono3/targets.json").read_text())
    assert targets["targets"] == "reference" and targets["monolingual"] == {
        "en-de": {"lines": 3, "kept": 3},
        "en-fi": {"lines": 3, "kept": 3},
    }
