"""`mlas-lora experiment`: table2 and lambda on tiny models, the paper-shaped tables and the plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mlas_lora.cli import main
from mlas_lora.config import config_from_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.report import ResultRecord
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.experiment import (
    budget_caption,
    experiment_config,
    experiment_systems,
    run_named_experiment,
    seed_groups,
    trainable_parameters,
)
from mlas_lora.experiments.tables import paper_table
from mlas_lora.methods.presets import TABLE2
from mlas_lora.testing.tiny import save_tiny
from test_pipeline import _write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    _write_corpus(root / "corpus", ["en-de", "en-fi"], n_test=2)
    return config_from_dict(ExperimentConfig, {
        "name": "tiny", "output_dir": str(root / "run"),
        "data": {"corpus": str(root / "corpus"), "directions": ["en-de", "en-fi"], "seed_per_direction": 4},
        "models": {"teacher": str(save_tiny(root / "teacher", role="teacher", seed=1)),
                   "student": str(save_tiny(root / "student", role="student", seed=2)), "dtype": "float32"},
        "generation": {"batch_size": 4, "max_new_tokens": 3},
        "evaluation": {"metrics": ["bleu", "chrf"], "bootstrap_samples": 10},
        "awareness": {"batch_size": 2, "lam": 0.55},
        "lora": {"r_gen": 4, "r_spe": 4},
        "training": {"max_steps": 1, "micro_batch": 4, "grad_accum": 1, "checkpoint_every": 1},
    })  # fmt: skip


def test_table2_runs_every_ablation_and_writes_tables_and_plots(tiny_config):
    folder = run_named_experiment("table2", tiny_config)
    table = (folder / "table.test.bleu.md").read_text()
    for system in TABLE2:
        assert f"| {system} |" in table
    assert "| System | en-de | en-fi | Avg. | Params |" in table and "better / worse than mlas-lora" in table
    rows = list(csv.reader(open(folder / "table.test.chrf.csv")))
    assert rows[0] == [
        "system", "seeds", "en-de", "en-de sd", "en-de p", "en-fi", "en-fi sd", "en-fi p", "avg", "avg sd",
        "trainable_params",
    ]  # fmt: skip
    params = {row[0]: int(row[-1]) for row in rows[1:]}
    assert params["R-i"] == params["R-a"] == params["R-s"]  # one LoRA of rank r_gen + r_spe
    assert (
        params["M-i"] > params["mlas-lora"] > params["R-i"]
    )  # ranks P (r_g + r_s) > r_g + P r_s > r_g + r_s
    assert (folder / "layer_relevance.png").stat().st_size > 0 and (folder / "neurons.png").is_file()
    run = folder.parent.parent
    sig = json.loads((folder / "significance.json").read_text())
    assert {r["system_b"] for r in sig} == {"mlas-lora"} and "R-a" in {r["system_a"] for r in sig}
    cells = {p.name for p in (run / "hyps").iterdir()}
    assert set(TABLE2) <= cells
    stamps = {p: p.stat().st_mtime_ns for p in (run / "hyps").rglob("*.jsonl")}
    run_named_experiment("table2", tiny_config)  # finished cells are kept, not recomputed
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_lambda_sweep_scores_the_teacher_once(tiny_config):
    folder = run_named_experiment("lambda", tiny_config, lambdas=[0.1, 0.4, 0.6])  # 2 pairs: 1/P = 0.5
    run = folder.parent.parent
    assert (folder / "lambda.png").stat().st_size > 0
    table = (folder / "table.test.bleu.md").read_text()
    assert "| lambda-0.4 |" in table and "| lambda-0.6 |" in table
    sig = json.loads((folder / "significance.json").read_text())  # against MLAS-LoRA as shipped
    assert {r["system_b"] for r in sig} == {"lambda-auto"} and "lambda-0.6" in {r["system_a"] for r in sig}
    assert len(list(run.glob("awareness-*"))) == 1  # one teacher pass for every lambda
    assert len(list(run.glob("classes-*"))) >= 3  # 0 (0.1 and 0.4), 0.6, auto side by side
    # 0.1 and 0.4 classify alike: one training, whose hypotheses serve both names (0.4 loads nothing)
    assert not (run / "train-lambda-0.4").exists()
    for path in (run / "hyps" / "lambda-0.4").glob("*.jsonl"):
        header, *rows = (json.loads(line) for line in path.read_text().splitlines())
        assert header["copied_from"] == "lambda-0.1" and header["seconds"] == 0
        assert rows == [
            json.loads(x) for x in (run / "hyps" / "lambda-0.1" / path.name).read_text().splitlines()[1:]
        ]
    params = {row[0]: row[-1] for row in csv.reader(open(folder / "table.test.bleu.csv"))}
    assert params["lambda-0.4"] == params["lambda-0.1"] != ""


def test_hypotheses_from_before_content_keys_gain_one_when_loaded(tmp_path):
    from mlas_lora.data.records import Example
    from mlas_lora.experiments.run import HypothesisStore

    store, examples = (
        HypothesisStore(tmp_path),
        [Example("en", "de", "a", "b"), Example("en", "de", "c", "d")],
    )
    store.save("old", "test", "en-de", "k1", examples, ["x", "y"], 1.0)  # no content key
    assert store.load("new", "test", "en-de", "k2", "c1", examples) is None  # nothing proves it is c1
    assert store.load("old", "test", "en-de", "k1", "c1", examples) == ["x", "y"]  # its key does
    assert store.load("new", "test", "en-de", "k2", "c1", examples) == ["x", "y"]
    assert store.load("other", "test", "en-de", "k3", "c1", examples[:1]) is None  # other segments


def test_one_name_under_two_configs_keeps_both_hypothesis_files(tmp_path):
    from mlas_lora.data.records import Example
    from mlas_lora.experiments.run import HypothesisStore

    store, examples = HypothesisStore(tmp_path), [Example("en", "de", "a", "b")]
    store.save("zero-shot", "test", "en-de", "full-key", examples, ["x"], 1.0, "full-content")
    store.save("zero-shot", "test", "en-de", "cpu-key", examples, ["y"], 1.0, "cpu-content")  # the budget's
    assert (tmp_path / "hyps" / "zero-shot@full-key" / "test.en-de.jsonl").is_file()
    assert store.load("zero-shot", "test", "en-de", "cpu-key", "cpu-content", examples) == ["y"]
    # back to the first config: found by content, nothing to translate, and the budget's file kept aside
    assert store.load("zero-shot", "test", "en-de", "full-key", "full-content", examples) == ["x"]
    assert store.load("zero-shot", "test", "en-de", "cpu-key", "cpu-content", examples) == ["y"]


def test_lambdas_below_one_over_p_share_one_classification_and_training(tiny_config):
    from mlas_lora.experiments.pipeline import train_key
    from mlas_lora.experiments.stages import awareness_keys
    from mlas_lora.experiments.systems import resolve_systems

    config = experiment_config(
        "lambda", tiny_config, experiment_systems("lambda", None, [0.1, 0.4, 0.6]), None
    )
    systems = {s.name: s for s in resolve_systems(config)}  # two pairs: 1/P = 0.5
    low, mid, high = (systems[f"lambda-{lam}"] for lam in (0.1, 0.4, 0.6))
    assert awareness_keys(low.config) == awareness_keys(mid.config) != awareness_keys(high.config)
    assert awareness_keys(low.config)[0] == awareness_keys(high.config)[0]  # one teacher pass
    assert train_key(low) == train_key(mid) != train_key(high)


def test_budget_scales_every_system_alike(tiny_config):
    config = experiment_config("table2", tiny_config, list(TABLE2), "cpu")
    assert config.training.max_steps == 48 and config.data.test_per_direction == 100
    assert config.evaluation.baseline_for_significance == "mlas-lora"
    small = experiment_config("table2", tiny_config, list(TABLE2), "cpu-small")
    assert small.training.max_steps == 16 and small.data.valid_per_direction == 0
    assert "max_steps 16" in budget_caption("cpu-small") and "no --budget" in budget_caption(None)
    with pytest.raises(MlasLoraError, match="unknown budget"):
        experiment_config("table2", tiny_config, list(TABLE2), "gpu-week")
    own = experiment_config("mine", tiny_config, None, None)  # a label alone: the config's systems
    assert own.systems == tiny_config.systems


def test_paper_table_bolds_the_best_and_marks_significance():
    records = [
        ResultRecord(s, d, "bleu", score, "sig", 10, "h")
        for s, d, score in [
            ("a", "en-de", 10.0),
            ("a", "en-fi", 30.0),
            ("b", "en-de", 12.0),
            ("b", "en-fi", 20.0),
        ]
    ]
    comparisons = [
        {
            "system_a": "b",
            "split": "test",
            "direction": "en-de",
            "metric": "bleu",
            "p_holm": 0.01,
            "delta": 2.0,
        },
        {
            "system_a": "b",
            "split": "test",
            "direction": "en-fi",
            "metric": "bleu",
            "p_holm": 0.2,
            "delta": -10,
        },
        {
            "system_a": "b",
            "split": "valid",
            "direction": "en-fi",
            "metric": "bleu",
            "p_holm": 0.001,
            "delta": -1,
        },
    ]
    md, rows = paper_table(records, "bleu", ["a", "b"], {"a": 0, "b": 2_500_000}, comparisons, "test", "a")
    assert "| a | 10.00 | **30.00** | **20.00** | 0 |" in md
    assert "| b | **12.00▲** | 20.00 | 16.00 | 2.50M |" in md  # en-fi's -10 is not significant here
    assert rows[2] == ["b", 1, 12.0, None, 0.01, 20.0, None, 0.2, 16.0, None, 2_500_000]
    worse = [{**comparisons[1], "p_holm": 0.01}]
    md, _ = paper_table(records, "bleu", ["a", "b"], {}, worse, "test", "a")
    assert "| b | **12.00** | 20.00▼ |" in md


def test_seed_rows_read_mean_and_sd():
    records = [
        ResultRecord(s, d, "bleu", score, "sig", 10, "h")
        for s, d, score in [("m", "en-de", 10.0), ("m", "en-fi", 20.0), ("m.seed1", "en-de", 12.0),
                            ("m.seed1", "en-fi", 22.0), ("z", "en-de", 1.0), ("z", "en-fi", 2.0)]
    ]  # fmt: skip
    groups = seed_groups(["z", "m", "m.seed1"])
    assert groups == {"z": ["z"], "m": ["m", "m.seed1"]}
    md, rows = paper_table(records, "bleu", ["z", "m", "m.seed1"], {}, [], "test", None, groups=groups)
    assert "| m | **11.00 ± 1.41** | **21.00 ± 1.41** | **16.00 ± 1.41** | — |" in md
    assert "| z | 1.00 | 2.00 | 1.50 | — |" in md and "mean ± sd over training seeds" in md
    assert rows[2][:2] == ["m", 2]


def test_experiment_command_prints_the_tables(tiny_config, tmp_path, capsys):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(json.loads(json.dumps(tiny_config.__dict__, default=lambda o: o.__dict__)))
    )
    assert main(["experiment", "pair", str(path), "--systems", "zero-shot,lora"]) == 0
    out = capsys.readouterr().out
    assert "| zero-shot |" in out and "| lora |" in out and "experiments/pair" in out
    run = Path(tiny_config.output_dir)
    if (run / "train-R-i").is_dir():  # table2 ran first in this module: lora is its -R-i training
        assert not (run / "train-lora").exists()  # so its hypotheses are R-i's, nothing retrained
        header = json.loads((run / "hyps" / "lora" / "test.en-de.jsonl").read_text().splitlines()[0])
        assert header["copied_from"] == "R-i"
    assert main(["experiment", "pair", str(path), "--systems", "nope"]) == 2


def test_pairs_transfer_and_family_analyses(tiny_config, tmp_path):
    from mlas_lora.experiments.analyses import pair_counts

    assert pair_counts(14) == [1, 2, 4, 8, 14] and pair_counts(1) == [1]
    folder = run_named_experiment("pairs", tiny_config, focus="en-fi")
    rows = list(csv.reader(open(folder / "pairs.csv")))
    assert rows[0] == ["pairs", "directions", "lora", "M-i", "mlas-lora"]
    assert [r[:2] for r in rows[1:]] == [["1", "en-fi"], ["2", "en-fi en-de"]] and (
        folder / "pairs.png"
    ).is_file()
    run = Path(tiny_config.output_dir)  # every direction: the main run's systems, in the main run
    assert not (folder / "pairs-2" / "hyps").exists() and (folder / "pairs-2" / "report.md").is_file()
    records = json.loads((folder / "pairs-2" / "results" / "test.json").read_text())["records"]
    bleu = {(r["system"], r["direction"]): r["score"] for r in records if r["metric"] == "bleu"}
    assert float(rows[2][4]) == bleu[("mlas-lora", "en-fi")] and (run / "hyps" / "M-i").is_dir()
    assert (folder / "pairs-1" / "hyps").is_dir()
    md = (folder / "pairs.md").read_text()
    assert f"| 2 | en-fi en-de | {float(rows[2][2]):.2f} |" in md and "no --budget" in md
    folder = run_named_experiment("transfer", tiny_config)
    rows = list(csv.reader(open(folder / "transfer.csv")))
    assert rows[0] == ["trained on", "en-de", "en-fi"] and [r[0] for r in rows[1:]] == ["en-de", "en-fi"]
    assert (folder / "transfer.png").stat().st_size > 0
    assert (
        f"| en-fi | {float(rows[2][1]):+.2f} | {float(rows[2][2]):+.2f} |"
        in (folder / "transfer.md").read_text()
    )
    one = json.loads((folder / "from-en-de" / "stages.json").read_text())
    assert any(name.startswith("train-mlas-lora") for name in one)
    assert not (folder / "zero-shot" / "hyps").exists() and (run / "hyps" / "zero-shot").is_dir()
    hyps = (folder / "from-en-de" / "hyps" / "mlas-lora").glob("test.*.jsonl")
    assert {p.name for p in hyps} == {"test.en-de.jsonl", "test.en-fi.jsonl"}  # every direction evaluated
    other = save_tiny(tmp_path / "llama", "llama", role="student", seed=3)
    folder = run_named_experiment(
        "family", tiny_config, systems=["zero-shot", "lora", "mlas-lora"], student=str(other)
    )
    assert "| mlas-lora |" in (folder / "report.md").read_text()
    table = (folder / "table.test.bleu.md").read_text()
    assert "| Params |" in table and "| zero-shot |" in table and "| mlas-lora |" in table
    assert "better / worse than mlas-lora" in table
    assert str(other) in (folder / "family.md").read_text()
    with pytest.raises(MlasLoraError, match="not one of data.directions"):
        run_named_experiment("pairs", tiny_config, focus="en-cs")


def test_the_parameter_column_reads_the_training_of_the_systems_key(tmp_path, tiny_config):
    """Its own folder when that holds its key, else the finished training of that key under another
    name, never its own folder's record of another key (another budget's training)."""
    from mlas_lora.config import to_dict
    from mlas_lora.experiments.pipeline import train_key
    from mlas_lora.experiments.stages import mark_done
    from mlas_lora.experiments.systems import resolve_system

    config = config_from_dict(ExperimentConfig, {**to_dict(tiny_config), "output_dir": str(tmp_path)})
    system, prompting = resolve_system("lora", config), resolve_system("zero-shot", config)
    assert trainable_parameters(prompting) == 0
    assert trainable_parameters(system) is None
    for name, key, count in [("lora", "another budget", 5), ("lora-lr1e-4", train_key(system), 7)]:
        (tmp_path / f"train-{name}").mkdir()
        (tmp_path / f"train-{name}" / "params.json").write_text(json.dumps({"trainable": count}))
        mark_done(tmp_path / f"train-{name}", key, 1.0)
    assert trainable_parameters(system) == 7
    mark_done(tmp_path / "train-lora", train_key(system), 1.0)
    assert trainable_parameters(system) == 5


def test_the_choice_is_made_on_valid_and_only_reported_on_test():
    from mlas_lora.experiments.tables import choice_on_valid

    def records(scores):
        return [ResultRecord(s, d, "chrf", v, "sig", 10, "h") for (s, d), v in scores.items()]

    valid = records({("a", "en-de"): 50.0, ("a", "en-fi"): 40.0, ("b", "en-de"): 48.0, ("b", "en-fi"): 46.0})
    test = records({("a", "en-de"): 60.0, ("a", "en-fi"): 60.0, ("b", "en-de"): 10.0, ("b", "en-fi"): 10.0})
    text = choice_on_valid(valid, test)
    assert text.startswith("Chosen on the validation split by average chrf: **b** (test average 10.00")
    assert "| 1 | b | 47.00 | 10.00 |" in text and "| 2 | a | 45.00 | 60.00 |" in text


def test_verdict_trains_each_system_with_every_seed_and_reuses_them(tiny_config):
    systems = ["zero-shot", "teacher", "lora", "lora-total", "pissa", "mlas-pissa", "mlas-lora"]
    folder = run_named_experiment("verdict", tiny_config, systems=systems, seeds=2)
    run = folder.parent.parent
    for name in ("lora", "pissa", "mlas-pissa", "mlas-lora"):
        assert (run / f"train-{name}.seed1").is_dir() and (run / "hyps" / f"{name}.seed1").is_dir()
    assert not (run / "hyps" / "zero-shot.seed1").exists()  # decoding is deterministic: once
    key0 = json.loads((run / "hyps" / "lora" / "test.en-de.jsonl").read_text().splitlines()[0])["key"]
    key1 = json.loads((run / "hyps" / "lora.seed1" / "test.en-de.jsonl").read_text().splitlines()[0])["key"]
    assert key0 != key1
    table = (folder / "table.test.bleu.md").read_text()
    assert "mean ± sd over training seeds" in table and "| lora.seed1 |" not in table
    assert all(f"| {name} |" in table for name in systems)
    rows = {r[0]: r for r in csv.reader(open(folder / "table.test.bleu.csv"))}
    assert rows["lora"][1] == "2" and rows["zero-shot"][1] == "1"
    params = {name: int(rows[name][-1]) for name in systems}
    assert params["lora-total"] > params["lora"] == params["pissa"] and params["teacher"] == 0
    sig = json.loads((folder / "significance.seeds.json").read_text())
    assert {r["system_b"] for r in sig} == {"mlas-lora"} and {
        r["strata"] for r in sig if r["system_a"] == "lora"
    } == {2}
    assert all(0 < r["p_value"] <= r["p_holm"] <= 1 for r in sig)
    named = experiment_config("verdict", tiny_config, ["lora", "lora.seed1"], None)  # seeds by name
    assert [s if isinstance(s, str) else (s["name"], s["training"]["seed"]) for s in named.systems] == [
        "lora",
        ("lora.seed1", 1),
    ]
    both = experiment_config("verdict", tiny_config, ["lora", "lora.seed1"], None, seeds=2)  # not twice
    assert [s if isinstance(s, str) else s["name"] for s in both.systems] == ["lora", "lora.seed1"]
    assert (folder / "verdict.png").stat().st_size > 0 and "### bleu" in (folder / "tables.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "hyps").rglob("*.jsonl")}
    run_named_experiment("verdict", tiny_config, systems=systems, seeds=2)  # every seed's cells reused
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_a_significantly_worse_system_is_marked_worse(tiny_config, tmp_path):
    from dataclasses import replace

    from mlas_lora.experiments.experiment import seed_significance
    from mlas_lora.experiments.run import HypothesisStore

    config = replace(tiny_config, output_dir=str(tmp_path))
    config = replace(config, evaluation=replace(config.evaluation, baseline_for_significance="base"))
    store = HypothesisStore(tmp_path)
    refs = [f"das ist der satz nummer {i} mit etwas mehr text" for i in range(40)]
    examples = [type("E", (), {"source": f"s{i}", "reference": r})() for i, r in enumerate(refs)]
    worse = [" ".join(r.split()[:3]) for r in refs]
    for name, hyps in (("base", refs), ("bad", worse), ("bad.seed1", worse), ("same", refs)):
        store.save(name, "test", "en-de", "k", examples, hyps, 0.0)
    groups = seed_groups(["base", "bad", "bad.seed1", "same"])
    sig = seed_significance(config, groups, ["test"], {"test": ["en-de"]}, 200)
    by_row = {(r["system_a"], r["metric"]): r for r in sig}
    assert by_row[("bad", "bleu")]["delta"] < 0 and by_row[("bad", "bleu")]["p_holm"] < 0.05
    assert by_row[("same", "chrf")]["p_value"] == 1.0
    records = [ResultRecord(s, "en-de", "bleu", v, "sig", 40, "h")
               for s, v in (("base", 100.0), ("bad", 5.0), ("bad.seed1", 5.0), ("same", 100.0))]  # fmt: skip
    md, _ = paper_table(records, "bleu", list(groups), {}, sig, "test", "base", groups=groups)
    assert "| bad | 5.00 ± 0.00▼ |" in md and "| same | **100.00** |" in md


def test_command_line_overrides_win_over_the_budget(tiny_config):
    config = experiment_config("verdict", tiny_config, ["lora"], "verdict")
    assert config.data.test_per_direction is None and config.data.ood_per_direction == 300  # every segment
    config = experiment_config(
        "verdict", tiny_config, ["lora"], "verdict", overrides={"data": {"test_per_direction": 300}}
    )
    assert config.data.test_per_direction == 300 and config.training.max_steps == 48


def test_seeds_on_an_analysis_are_refused_before_it_runs(tiny_config, monkeypatch):
    import mlas_lora.experiments.experiment as experiment

    def must_not_run(*args, **kwargs):
        raise AssertionError("the analysis ran")

    monkeypatch.setattr(experiment, "run_analysis", must_not_run)
    with pytest.raises(MlasLoraError, match="--seeds applies to system tables, not to the pairs"):
        run_named_experiment("pairs", tiny_config, seeds=2)
