"""A corpus rewritten in place (issue 25): the same files, the same line counts, other text. Every key
hashes the config, not the data, so each stage that read rows keeps their hash (`data`) beside its key
and is made again, with one line saying so, when they change; one from before the hash is adopted."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.curve import learning_curve
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.data_hash import combine_digests, rows_digest, seed_data
from mlas_lora.experiments.pipeline import train_key, train_stage, training_data
from mlas_lora.experiments.run import HypothesisStore, run_experiment
from mlas_lora.experiments.stages import awareness_stage
from mlas_lora.experiments.systems import resolve_system
from test_pipeline import stage_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CHANGED = "the corpus rows it read changed since it was made"


def rewrite(root, split: str, suffix: str = " again") -> None:
    """Every line of `split`.en-de.tsv with other text (`suffix` added to both sides), in place."""
    path = root / "corpus" / f"{split}.en-de.tsv"
    pairs = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
    path.write_text(
        "".join(f"{src}{suffix}\t{tgt}{suffix.upper()}\n" for src, tgt in pairs), encoding="utf-8"
    )


def marker(folder, name: str = "stage.json") -> dict:
    return json.loads((folder / name).read_text())


def stamps(run) -> dict:
    """The modification time of every training checkpoint and teacher stage file of a run."""
    teacher = [
        path for kind in ("awareness", "classes", "transfer") for path in run.glob(f"{kind}-*/*.safetensors")
    ]
    files = [*run.glob("train-*/checkpoints/*/adapters/*"), *teacher]
    assert files
    return {path.relative_to(run): path.stat().st_mtime_ns for path in files}


def test_the_rows_digest_tells_rows_apart_by_their_fields():
    one = {"en-de": [Example("en", "de", "open file", "DATEI")]}
    assert rows_digest(one) == rows_digest({"en-de": [Example("en", "de", "open file", "DATEI")]})
    moved = {"en-de": [Example("en", "de", "open", "file DATEI")]}
    assert len({rows_digest(one), rows_digest(moved), rows_digest({"de-en": one["en-de"]})}) == 3


def test_a_rewritten_training_split_trains_again_and_sets_the_old_training_aside(tmp_path, capsys):
    """The old LoRA training was reused under the same key; in-context's shots come from the same
    split, so its hypotheses are translated again too. The old training comes back with its rows."""
    config = replace(tiny_config(tmp_path), systems=["in-context", "lora"])
    run, system = tmp_path / "run", resolve_system("lora", config)
    run_experiment(config)
    first = training_data(system, load_splits(config.data))
    original = (tmp_path / "corpus" / "train.en-de.tsv").read_text(encoding="utf-8")
    capsys.readouterr()
    rewrite(tmp_path, "train")
    report = run_experiment(config).read_text()
    assert f"train-lora: {CHANGED}" in capsys.readouterr().err
    assert "cached from an earlier run" not in report
    aside = run / f"train-lora@{train_key(system)[:8]}.data-{first[:8]}"
    assert marker(aside)["data"] == first
    assert marker(run / "train-lora")["data"] == training_data(system, load_splits(config.data)) != first
    (tmp_path / "corpus" / "train.en-de.tsv").write_text(original, encoding="utf-8")
    run_experiment(config)  # the first rows again: their training is found, not trained again
    assert (run / "train-lora").resolve() == aside.resolve()


def test_rewritten_seed_sentences_score_the_teacher_again(tmp_path, capsys):
    """The awareness stage read the dev split's seed sentences: it scores them again, alone (`mlas-lora
    score`) or in a run, and the classes, transfer and training made from it are made again."""
    config = replace(tiny_config(tmp_path), systems=["mlas-lora"])
    run = tmp_path / "run"
    run_experiment(config)
    scored = stage_dir(run, "awareness")
    made = (scored / "awareness.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    rewrite(tmp_path, "dev")
    splits = load_splits(config.data, ("train", "dev"))
    awareness_stage(config, splits, run)
    assert capsys.readouterr().err.count(CHANGED) == 2  # the scores, then the classes made from them
    assert marker(scored)["data"] == marker(stage_dir(run, "classes"))["data"] == seed_data(splits)
    assert (scored / "awareness.safetensors").stat().st_mtime_ns != made
    report = run_experiment(config).read_text()
    err = capsys.readouterr().err
    assert f"{stage_dir(run, 'transfer')}: {CHANGED}" in err and f"train-mlas-lora: {CHANGED}" in err
    assert "cached from an earlier run" not in report
    system = resolve_system("mlas-lora", config)
    assert marker(run / "train-mlas-lora")["data"] == training_data(system, load_splits(config.data))


def test_the_same_text_written_again_is_reused(tmp_path, capsys):
    """Rows, not files: the corpus written again with the same text (a new mtime) retrains nothing."""
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    run_experiment(config)
    before = stamps(run)
    for split in ("train", "dev", "test"):
        rewrite(tmp_path, split, suffix="")
    capsys.readouterr()
    report = run_experiment(config).read_text()
    assert CHANGED not in capsys.readouterr().err and stamps(run) == before
    assert report.count("cached from an earlier run") == 3
    splits = load_splits(config.data)
    for name in ("lora", "mlas-lora"):
        assert marker(run / f"train-{name}")["data"] == training_data(resolve_system(name, config), splits)
    assert marker(stage_dir(run, "transfer"))["data"] == seed_data(splits)


def test_stages_made_before_the_hash_are_adopted_then_checked(tmp_path, capsys):
    """A run folder of an older version (no `data` in any marker): reused as it is, each marker gets
    the hash on this first reuse, even behind cached hypotheses, so a later edit is noticed."""
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    run_experiment(config)
    markers = [*run.glob("*-*/stage.json"), *run.glob("train-*/key.json")]
    for path in markers:
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "data"}))
    hyps = sorted((run / "hyps").glob("*/*.jsonl"))
    for path in hyps:
        rows = HypothesisStore._rows(path)
        HypothesisStore._write(path, [{k: v for k, v in rows[0].items() if k != "data"}, *rows[1:]])
    before = stamps(run)
    capsys.readouterr()
    assert run_experiment(config).read_text().count("cached from an earlier run") == 3
    assert CHANGED not in capsys.readouterr().err and stamps(run) == before
    assert all("data" in json.loads(path.read_text()) for path in run.glob("*-*/stage.json"))
    trained = [path for path in hyps if path.parent.name != "zero-shot"]  # zero-shot reads no other rows
    assert trained and all("data" in HypothesisStore._rows(path)[0] for path in trained)
    rewrite(tmp_path, "train")
    run_experiment(config)
    err = capsys.readouterr().err
    assert f"train-lora: {CHANGED}" in err and f"train-mlas-lora: {CHANGED}" in err


def test_an_unfinished_training_of_other_rows_is_set_aside_not_resumed(tmp_path, capsys):
    """Killed after a checkpoint, then the training split rewritten: resuming would mix the rows."""
    config = tiny_config(tmp_path)
    run, system = tmp_path / "run", resolve_system("lora", config)
    splits = load_splits(config.data, ("train", "dev"))
    train_stage(system, splits, run)
    (run / "train-lora" / "stage.json").unlink()  # as if killed after its last checkpoint
    first = training_data(system, splits)
    rewrite(tmp_path, "train")
    capsys.readouterr()
    splits = load_splits(config.data, ("train", "dev"))
    train_stage(system, splits, run)
    assert f"train-lora: {CHANGED}" in capsys.readouterr().err
    aside = run / f"train-lora@{train_key(system)[:8]}.data-{first[:8]}"
    assert (aside / "checkpoints" / "step-000002" / "adapters").is_dir()  # kept, not resumed
    assert marker(run / "train-lora")["data"] == training_data(system, splits) != first


def test_the_learning_curve_refuses_a_training_of_other_rows_and_recomputes_its_points(tmp_path):
    config = replace(tiny_config(tmp_path), systems=["lora"])
    run_experiment(config)
    learning_curve(config, ["lora"], segments=2)
    rewrite(tmp_path, "train")
    with pytest.raises(MlasLoraError, match="train-lora was trained on other corpus rows"):
        learning_curve(config, ["lora"], segments=2)
    run_experiment(config)
    learning_curve(config, ["lora"], segments=2)
    stored = json.loads((tmp_path / "run" / "curve" / "curve.json").read_text())["lora"]
    splits = load_splits(config.data, ("train", "dev", "valid"))
    valid = {d: ex[:2] for d, ex in splits.valid.items()}
    train = training_data(resolve_system("lora", config), splits)
    assert stored["data"] == combine_digests({"valid": rows_digest(valid), "train": train})
