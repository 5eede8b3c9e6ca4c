"""End to end on tiny models: `run_experiment` runs every stage, writes the report, and skips on re-run."""

import json

import pytest

from mlas_lora.config import config_from_dict
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.run import run_experiment
from mlas_lora.testing.tiny import save_tiny

WORDS = ["open", "file", "save", "close", "print", "page", "table", "chart", "cell", "sheet"]


def _write_corpus(folder, directions, n_train=12, n_dev=6, n_test=3):
    folder.mkdir()
    for direction in directions:
        for split, n, offset in (("train", n_train, 0), ("dev", n_dev, 100), ("test", n_test, 200)):
            rows = []
            for i in range(n):
                words = " ".join(WORDS[(i + offset + k) % len(WORDS)] for k in range(4))
                rows.append(f"{words} {i + offset}\t{words.upper()} {i + offset}")
            (folder / f"{split}.{direction}.tsv").write_text("\n".join(rows) + "\n")


TINY_SECTIONS = {
    "generation": "{batch_size: 4, max_new_tokens: 3}",
    "awareness": "{batch_size: 2}",
    "lora": "{r_gen: 4, r_spe: 4}",
    "training": "{max_steps: 1, micro_batch: 4, grad_accum: 1}",
}


def write_tiny_experiment(root, name: str, systems: str, **sections: str):
    """`root/tiny.yaml`: `systems` (YAML flow text) on an en-de/de-en tiny corpus with a tiny teacher
    and student, small decoding, scoring and training (TINY_SECTIONS; `sections` replace or add
    top-level sections, e.g. `evaluation="{metrics: [bleu]}"`). Returns (config path, student folder)."""
    _write_corpus(root / "corpus", ["en-de", "de-en"])
    teacher = save_tiny(root / "teacher", role="teacher", seed=1)
    student = save_tiny(root / "student", role="student", seed=2)
    lines = [
        f"name: {name}",
        f"output_dir: {root / 'run'}",
        f"systems: {systems}",
        f"data: {{corpus: {root / 'corpus'}, directions: [en-de, de-en], seed_per_direction: 4}}",
        f"models: {{teacher: {teacher}, student: {student}, dtype: float32}}",
        *(f"{key}: {value}" for key, value in {**TINY_SECTIONS, **sections}.items()),
    ]
    path = root / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, student


def stage_dir(run, kind: str):
    """The one folder of a teacher stage (`kind-<key>`) in a run with a single variant of it."""
    (folder,) = run.glob(f"{kind}-*")
    return folder


def tiny_config(root, dtype: str = "float32") -> ExperimentConfig:
    """A two-direction config of zero-shot, LoRA and MLAS-LoRA on a tiny corpus, teacher and student
    written under `root`; the run folder is `root/run`."""
    directions = ["en-de", "en-fi"]
    _write_corpus(root / "corpus", directions)
    teacher = save_tiny(root / "teacher", role="teacher", seed=1)
    student = save_tiny(root / "student", role="student", seed=2)
    return config_from_dict(ExperimentConfig, {
        "name": "tiny", "output_dir": str(root / "run"), "systems": ["zero-shot", "lora", "mlas-lora"],
        "data": {"corpus": str(root / "corpus"), "directions": directions, "seed_per_direction": 4,
                 "valid_per_direction": 2},
        "models": {"teacher": str(teacher), "student": str(student), "dtype": dtype},
        "generation": {"batch_size": 4, "max_new_tokens": 4},
        "evaluation": {"metrics": ["bleu", "chrf"], "bootstrap_samples": 20},
        "awareness": {"batch_size": 2},
        "lora": {"r_gen": 4, "r_spe": 4},
        "training": {"max_steps": 2, "micro_batch": 4, "grad_accum": 2, "checkpoint_every": 1, "lr": 1e-3},
    })  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(root)
    report = run_experiment(config)
    return config, root / "run", report


def test_every_stage_writes_its_files(tiny_run):
    _, run, _ = tiny_run
    for path in [
        "config.yaml", "manifest.json", "train-lora/checkpoints/step-000002/training_state.pt",
        "train-lora/checkpoints/step-000002/adapters/adapter_config.json",
        "adapters-lora/adapter_config.json", "train-mlas-lora/checkpoints/step-000002/adapters",
        "adapters-mlas-lora/en-de/adapter_config.json", "adapters-mlas-lora/en-fi/adapter_model.safetensors",
        "results/test.json", "significance.json", "report.md", "stages.json",
        "hyps/mlas-lora/test.en-fi.jsonl",
    ]:  # fmt: skip
        assert (run / path).exists(), path
    for kind, files in (
        ("awareness", ("awareness.safetensors", "awareness.json")),
        ("classes", ("classes.safetensors",)),
        ("transfer", ("factors.safetensors", "transfer.json")),
    ):
        assert all((stage_dir(run, kind) / f).is_file() for f in files), kind
    awareness = json.loads((stage_dir(run, "awareness") / "awareness.json").read_text())
    assert awareness["pairs"] == ["en-de", "en-fi"] and len(awareness["selected_layers"]) == 2


def test_report_holds_every_system_and_direction(tiny_run):
    _, run, report = tiny_run
    text = report.read_text()
    assert "| System | en-de | en-fi | Avg. |" in text
    for system in ("zero-shot", "lora", "mlas-lora"):
        assert f"| {system} |" in text
    assert "mlas-lora | lora | en-de | BLEU" in text
    assert "Neurons (lambda 0.2, Phi normalised per pair by `tokens`; a neuron is one coordinate" in text
    assert "): general 0, specific" in text and "no neuron can be general" in text
    assert "reading `source`" in text and "Seed tokens scored per pair (Eq. 2): en-de " in text
    records = json.loads((run / "results/test.json").read_text())["records"]
    assert {(r["system"], r["direction"], r["metric"]) for r in records} == {
        (s, d, m)
        for s in ("zero-shot", "lora", "mlas-lora")
        for d in ("en-de", "en-fi")
        for m in ("bleu", "chrf")
    }


def test_rerun_skips_every_stage(tiny_run):
    config, run, report = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.suffix != ".md"}
    before = report.read_text().split("## Wall time")[0]
    run_experiment(config)
    assert report.read_text().split("## Wall time")[0] == before
    assert "cached from an earlier run" in report.read_text()
    changed = [
        p
        for p, t in stamps.items()
        if p.stat().st_mtime_ns != t
        and p.name
        not in ("manifest.json", "config.yaml", "test.json", "valid.json", "significance.json", "stages.json")
    ]
    assert changed == []


def test_changing_lambda_reclassifies_without_rescoring(tiny_run):
    from dataclasses import replace

    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.stages import awareness_stage

    config, run, _ = tiny_run
    scored = stage_dir(run, "awareness") / "awareness.safetensors"
    scored_stamp = scored.stat().st_mtime_ns
    auto = replace(config, awareness=replace(config.awareness, lam="auto"))
    _, classes = awareness_stage(auto, load_splits(auto.data, ("dev",)), run)
    assert scored.stat().st_mtime_ns == scored_stamp
    meta = json.loads((classes / "classes.json").read_text())
    assert meta["lambda"] == pytest.approx(0.56923, abs=1e-5)  # auto for 2 pairs
    total = replace(config, awareness=replace(config.awareness, normalize="total"))
    _, classes = awareness_stage(total, load_splits(total.data, ("dev",)), run)
    assert scored.stat().st_mtime_ns == scored_stamp
    assert json.loads((classes / "classes.json").read_text())["normalize"] == "total"
    _, classes = awareness_stage(config, load_splits(config.data, ("dev",)), run)  # back to 0.2, tokens
    meta = json.loads((classes / "classes.json").read_text())
    assert meta["lambda"] == 0.2 and meta["normalize"] == "tokens"
    assert len(list(run.glob("classes-*"))) == 3 and len(list(run.glob("awareness-*"))) == 1  # side by side


def test_changing_test_sizes_retrains_nothing(tiny_run):
    from dataclasses import replace

    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.pipeline import train_key, train_stage
    from mlas_lora.experiments.systems import resolve_system

    config, run, _ = tiny_run
    marker = run / "train-mlas-lora/stage.json"
    stamp = marker.stat().st_mtime_ns
    bigger = replace(config, data=replace(config.data, test_per_direction=2, ood_per_direction=None, shots=3))
    train_stage(resolve_system("mlas-lora", bigger), load_splits(bigger.data, ("train", "dev")), run)
    assert marker.stat().st_mtime_ns == stamp
    more_data = replace(config, data=replace(config.data, train_per_direction=8))
    keys = [train_key(resolve_system("lora", c)) for c in (config, bigger, more_data)]
    assert keys[0] == keys[1] != keys[2]
    # the LoRA baseline reads neither the teacher nor the awareness settings: they do not retrain it
    other_teacher = replace(config, models=replace(config.models, teacher="elsewhere"))
    other_lambda = replace(config, awareness=replace(config.awareness, lam=0.6))  # above 1/P = 0.5
    assert {train_key(resolve_system("lora", c)) for c in (config, other_teacher, other_lambda)} == {keys[0]}
    assert train_key(resolve_system("mlas-lora", other_lambda)) != train_key(
        resolve_system("mlas-lora", config)
    )


def test_a_finished_training_of_another_key_is_parked_not_deleted(tiny_run):
    from dataclasses import replace

    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.pipeline import train_key, train_stage
    from mlas_lora.experiments.systems import resolve_system

    config, run, _ = tiny_run
    splits = load_splits(config.data, ("train", "dev"))
    lora = resolve_system("lora", config)
    train_stage(lora, splits, run)
    first = (run / "train-lora").resolve()
    marker = first / "stage.json"
    stamp, key = marker.stat().st_mtime_ns, train_key(lora)
    other = resolve_system("lora", replace(config, training=replace(config.training, lr=3e-4)))
    train_stage(other, splits, run)  # another key: the finished training moves aside, not away
    parked = run / f"train-lora@{key[:8]}"
    assert first.name == "train-lora" and parked.is_dir()
    assert json.loads((parked / "stage.json").read_text())["key"] == key
    assert json.loads((run / "train-lora" / "stage.json").read_text())["key"] == train_key(other)
    train_stage(lora, splits, run)  # the first key again: found parked, not retrained
    assert (run / "train-lora").is_symlink()
    assert json.loads(((run / "train-lora").resolve() / "stage.json").read_text())["key"] == key
    assert ((run / "train-lora").resolve() / "stage.json").stat().st_mtime_ns == stamp


def test_valid_split_is_translated_scored_and_reported(tiny_run):
    """Hyper-parameters are chosen on valid (dev minus the seeds): it gets hyps, results and bootstrap rows."""
    from mlas_lora.experiments.data import load_splits

    config, run, report = tiny_run
    splits = load_splits(config.data, ("dev", "valid"))
    for direction in ("en-de", "en-fi"):
        rows = (run / f"hyps/mlas-lora/valid.{direction}.jsonl").read_text().splitlines()[1:]
        sources = [json.loads(row)["source"] for row in rows]
        assert sources == [e.source for e in splits.valid[direction]] and len(sources) == 2
        assert not set(sources) & {e.source for e in splits.dev[direction]}
    records = json.loads((run / "results/valid.json").read_text())["records"]
    assert {(r["system"], r["direction"]) for r in records} == {
        (s, d) for s in ("zero-shot", "lora", "mlas-lora") for d in ("en-de", "en-fi")
    }
    text = report.read_text()
    assert text.index("## Validation (for choosing hyper-parameters)") < text.index("## In-domain test")
    assert "| mlas-lora | lora | en-de (valid) | BLEU |" in text


def test_trained_systems_are_evaluated_unmerged_unless_asked(tiny_run):
    """The LoRA baseline reaches translation as a PeftModel with its adapter unmerged (exact)."""
    from dataclasses import replace

    from peft import PeftModel

    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.pipeline import train_stage
    from mlas_lora.experiments.run import system_key
    from mlas_lora.experiments.systems import resolve_system

    config, run, _ = tiny_run
    splits = load_splits(config.data, ("train", "dev"))
    lora = resolve_system("lora", config)
    student = lora.method.for_evaluation(train_stage(lora, splits, run), config.evaluation.merge)
    assert isinstance(student.model, PeftModel) and lora.method.route(student) is None
    assert any(getattr(m, "merged", None) is False for m in student.model.modules() if hasattr(m, "lora_A"))
    merging = replace(config, evaluation=replace(config.evaluation, merge="weights"))
    merged_lora = resolve_system("lora", merging)
    student = merged_lora.method.for_evaluation(train_stage(merged_lora, splits, run), "weights")
    assert not isinstance(student.model, PeftModel)
    assert system_key(lora) != system_key(merged_lora)
    zero = [resolve_system("zero-shot", c) for c in (config, merging)]
    assert system_key(zero[0]) == system_key(zero[1])


def test_training_logs_the_update_norm_every_step(tiny_run):
    _, run, _ = tiny_run
    lora = json.loads((run / "train-lora/train_log.json").read_text())["history"]
    routed = json.loads((run / "train-mlas-lora/train_log.json").read_text())["history"]
    assert [set(r["update_norm"]) for r in lora] == [{"all"}] * len(lora) and lora[-1]["update_norm"][
        "all"
    ] > 0
    assert all(set(r["update_norm"]) == {"en-de", "en-fi"} for r in routed)


def test_learning_curve_scores_every_checkpoint_and_resumes(tiny_run):
    from mlas_lora.experiments.curve import leader_by_step, learning_curve

    config, run, _ = tiny_run
    png = learning_curve(config, ["lora", "mlas-lora"], segments=2)
    assert png.is_file() and png.stat().st_size > 0 and (run / "curve/curve.csv").is_file()
    results = json.loads((run / "curve/curve.json").read_text())
    assert set(results["lora"]["points"]) == {"0", "1", "2"} == set(results["mlas-lora"]["points"])
    # step 0 of LoRA (B = 0) is the untuned student: the zero-shot system's validation hypotheses
    zero = {
        d: [
            json.loads(line)["hypothesis"]
            for line in (run / f"hyps/zero-shot/valid.{d}.jsonl").read_text().splitlines()[1:]
        ]
        for d in ("en-de", "en-fi")
    }
    from mlas_lora.experiments.curve import _score
    from mlas_lora.experiments.data import load_splits

    valid = load_splits(config.data, ("dev", "valid")).valid
    assert results["lora"]["points"]["0"]["chrf"] == pytest.approx(_score(zero, valid)["chrf"])
    stamp = (run / "curve/curve.json").stat().st_mtime_ns
    learning_curve(config, ["lora"], segments=2)  # every point cached: nothing translated again
    again = json.loads((run / "curve/curve.json").read_text())
    assert again["lora"] == results["lora"] and (run / "curve/curve.json").stat().st_mtime_ns != stamp
    assert [step for step, _, _ in leader_by_step(results)] == [0, 1, 2]


def test_learning_curve_refuses_a_training_of_another_config(tiny_run):
    """Checkpoints trained under other settings (another lr, or without the budget they ran under)
    would be loaded into a differently built student and scored as this config's: an error instead."""
    from mlas_lora.config import config_from_dict, to_dict
    from mlas_lora.errors import MlasLoraError
    from mlas_lora.experiments.curve import learning_curve

    config, _, _ = tiny_run
    tree = to_dict(config)
    tree["training"]["lr"] = 5e-3
    with pytest.raises(MlasLoraError, match="train-lora holds a training of another config"):
        learning_curve(config_from_dict(ExperimentConfig, tree), ["lora"], segments=2)


def test_learning_curve_finds_the_training_of_its_key_under_another_name(tiny_run):
    """`lora` of the main config reads a sweep's `lora-lr1e-4` training when their keys are equal."""
    from mlas_lora.config import config_from_dict, to_dict
    from mlas_lora.experiments.curve import learning_curve

    config, run, _ = tiny_run
    learning_curve(config, ["lora"], segments=2)  # cached where the test above ran
    tree = to_dict(config)
    tree["systems"] = [{"name": "lora-again", "preset": "lora"}]
    png = learning_curve(config_from_dict(ExperimentConfig, tree), ["lora-again"], segments=2)
    results = json.loads((png.parent / "curve.json").read_text())
    scores = {
        name: {step: (p["bleu"], p["chrf"]) for step, p in results[name]["points"].items()}
        for name in ("lora", "lora-again")
    }
    assert scores["lora-again"] == scores["lora"] and set(scores["lora"]) == {"0", "1", "2"}
    rows = (png.parent / "curve.csv").read_text().splitlines()
    norms = [row.split(",")[-1] for row in rows if row.startswith("lora-again,")]
    assert norms[0] == "0.0" and all(float(n) > 0 for n in norms[1:])  # read from train-lora's log
    assert not (run / "train-lora-again").exists()


def test_with_budget_is_the_config_experiment_runs():
    from mlas_lora.config import to_dict
    from mlas_lora.errors import MlasLoraError
    from mlas_lora.experiments.experiment import experiment_config, with_budget

    config = config_from_dict(ExperimentConfig, {"name": "x", "systems": ["lora"]})
    budgeted = with_budget(config, "cpu")
    assert budgeted.training.max_steps == 48 and budgeted.data.valid_per_direction == 50
    assert to_dict(budgeted) == to_dict(experiment_config("sweep", config, None, "cpu"))
    assert with_budget(config, None) is config
    with pytest.raises(MlasLoraError, match="unknown budget"):
        with_budget(config, "gpu")


def test_stage_markers_are_written_atomically_and_a_garbled_one_means_not_done(tmp_path):
    from mlas_lora.experiments.stages import mark_done, stage_done

    folder = tmp_path / "run" / "transfer-abc"
    folder.mkdir(parents=True)
    (folder / "stage.json").write_text('{"key": "abc"')  # cut off by a kill in an older version
    assert not stage_done(folder, "abc")
    mark_done(folder, "abc", 1.0)
    assert stage_done(folder, "abc") and json.loads((tmp_path / "run" / "stages.json").read_text()) == {
        "transfer-abc": 1.0
    }
    assert sorted(p.name for p in folder.iterdir()) == ["stage.json"]  # no temporary file left


def test_a_splits_directions_are_translated_in_one_call_and_cut_back_per_direction(tmp_path, monkeypatch):
    """Continuous batching fills its batch across directions: each split is one translate() call with
    every direction's requests (in-context demos still from each direction's own training split), and
    each direction's hypothesis file holds that direction's sources, in order."""
    import mlas_lora.experiments.run as run_module
    from mlas_lora.experiments.data import load_splits

    config = replace_systems(tiny_config(tmp_path), ["zero-shot", "in-context"])
    calls: list[list[str]] = []
    real = run_module.translate

    def recording(model, tokenizer, requests, *args, **kwargs):
        calls.append([r.pair for r in requests])
        for r in requests:  # every demonstration comes from the request's own direction
            assert all((d.src_lang, d.tgt_lang) == (r.src_lang, r.tgt_lang) for d in r.demos)
        return real(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(run_module, "translate", recording)
    run_experiment(config)
    splits = load_splits(config.data, ("valid", "test"))
    assert len(calls) == 4  # 2 systems x 2 splits (valid, test)
    assert all(sorted(set(c)) == ["en-de", "en-fi"] for c in calls)
    for split in ("valid", "test"):
        for direction, examples in splits.get(split).items():
            rows = (tmp_path / "run" / "hyps" / "in-context" / f"{split}.{direction}.jsonl").read_text()
            sources = [json.loads(line)["source"] for line in rows.splitlines()[1:]]
            assert sources == [e.source for e in examples]


def replace_systems(config: ExperimentConfig, systems: list[str]) -> ExperimentConfig:
    from dataclasses import replace

    return replace(config, systems=systems)
