"""Hardening, round 2 (issue 25), on tiny models: what a changed corpus, Unicode line separators, a
damaged or misnamed checkpoint and cut small files do to a run folder, each case as a user meets it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from safetensors.torch import load_file, save_file

from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.pipeline import initial_student, train_key, train_stage
from mlas_lora.experiments.run import HypothesisStore, run_experiment
from mlas_lora.experiments.systems import resolve_system
from mlas_lora.stage_files import json_line, json_lines
from test_pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_shot(root):
    """The tiny pipeline config with its untrained system only (nothing to train: a run takes seconds)."""
    return replace(tiny_config(root), systems=["zero-shot"])


def set_test_line(root, direction: str, line: str) -> None:
    """Replace the first line of a test TSV in place (same number of lines, as an edit in an editor)."""
    path = root / "corpus" / f"test.{direction}.tsv"
    lines = path.read_text(encoding="utf-8").split("\n")
    path.write_text("\n".join([line, *lines[1:]]), encoding="utf-8")


def hyp_rows(root, direction: str, split: str = "test") -> list[dict]:
    return HypothesisStore._rows(HypothesisStore(root / "run").path("zero-shot", split, direction))


def test_cached_hypotheses_of_edited_test_sentences_are_translated_again(tmp_path):
    """A test file edited in place keeps every key (they hash the config, not the data): the cached
    rows are checked against the current sources and references instead."""
    config = zero_shot(tmp_path)
    run_experiment(config)
    untouched = HypothesisStore(tmp_path / "run").path("zero-shot", "test", "en-fi")
    stamp = untouched.stat().st_mtime_ns
    set_test_line(tmp_path, "en-de", "print the chart now\tDRUCKE DAS DIAGRAMM JETZT")
    report = run_experiment(config).read_text()
    assert "cached from an earlier run" not in report  # en-de was translated again
    rows = hyp_rows(tmp_path, "en-de")
    assert (rows[1]["source"], rows[1]["reference"]) == ("print the chart now", "DRUCKE DAS DIAGRAMM JETZT")
    assert untouched.stat().st_mtime_ns == stamp  # the unchanged direction stays cached


def test_a_reference_with_line_separators_survives_a_second_run(tmp_path):
    """U+2028, U+2029 and U+0085 inside a segment: written escaped, read split on "\\n" only."""
    config = zero_shot(tmp_path)
    reference = "OFFEN\u2028DATEI\u2029SPEICHERN\x85SCHLIESSEN 200"
    set_test_line(tmp_path, "en-de", f"open file save close 200\t{reference}")
    run_experiment(config)
    report = run_experiment(config).read_text()  # the first version failed here (JSONDecodeError)
    assert "cached from an earlier run" in report
    assert hyp_rows(tmp_path, "en-de")[1]["reference"] == reference
    raw = HypothesisStore(tmp_path / "run").path("zero-shot", "test", "en-de").read_text(encoding="utf-8")
    assert not {"\u2028", "\u2029", "\x85"} & set(raw)
    assert [json.loads(line) for line in raw.splitlines()] == json_lines(raw)  # any reader splits alike


def test_json_lines_read_what_an_older_writer_left_raw():
    value = {"reference": "a\u2028b\u2029c\x85d"}
    older = json.dumps(value, ensure_ascii=False) + "\n"  # how hypothesis files were written before
    assert json_lines(older) == [value] and json.loads(json_line(value)) == value
    assert len((json_line(value) + "\n").splitlines()) == 1


def test_a_cut_hypothesis_file_and_a_cut_stages_json_are_not_done(tmp_path):
    config = zero_shot(tmp_path)
    run_experiment(config)
    hyps = HypothesisStore(tmp_path / "run").path("zero-shot", "test", "en-de")
    text = hyps.read_text(encoding="utf-8")
    hyps.write_text(text[: len(text) // 2], encoding="utf-8")  # a kill or a full disk in an older version
    (tmp_path / "run" / "stages.json").write_text('{"awareness-1234": 1.')
    run_experiment(config)
    again = json_lines(hyps.read_text(encoding="utf-8"))
    first = json_lines(text)
    assert again[1:] == first[1:]  # translated again, the same (the header's seconds vary with load)
    assert {k: v for k, v in again[0].items() if k != "seconds"} == {
        k: v for k, v in first[0].items() if k != "seconds"
    }


def test_a_peft_checkpoint_with_other_names_or_shapes_or_cut_is_refused(tmp_path):
    """PEFT's own loader skips tensors it does not find: the run then went on with the untrained
    LoRA (B = 0) and exported it over the good adapters."""
    config = tiny_config(tmp_path)
    system = resolve_system("lora", config)
    student = initial_student(system, load_splits(config.data, ("train", "dev")), tmp_path / "run")
    system.method.save(student, tmp_path / "good")
    saved = load_file(tmp_path / "good" / "adapter_model.safetensors")
    variants = {
        "renamed": ({k.replace("lora_B", "lora_b"): v for k, v in saved.items()}, "missing: .*unexpected: "),
        "reshaped": ({k: v[:1] if "lora_A" in k else v for k, v in saved.items()}, "shape: "),
    }
    before = {k: v.clone() for k, v in student.model.state_dict().items() if "lora_" in k}
    for name, (tensors, problem) in variants.items():
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "adapter_model.safetensors")
        with pytest.raises(MlasLoraError, match=f"adapter_model.safetensors: does not match .*{problem}"):
            system.method.load(student, tmp_path / name)
    cut = tmp_path / "cut" / "adapter_model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes()[:300])
    with pytest.raises(MlasLoraError, match="cut.*truncated or corrupt safetensors file"):
        system.method.load(student, cut.parent)
    after = {k: v for k, v in student.model.state_dict().items() if "lora_" in k}
    assert all(after[k].equal(v) for k, v in before.items())  # nothing was copied
    system.method.load(student, tmp_path / "good")


def test_cut_small_files_of_a_training_mean_not_done_and_nothing_is_lost(tmp_path):
    """An empty key.json and params.json (a full disk, older version) do not fail later commands;
    an unfinished training of another config is parked, not deleted, and resumed when it comes back."""
    config = tiny_config(tmp_path)
    splits = load_splits(config.data, ("train", "dev"))
    run, first = tmp_path / "run", resolve_system("lora", config)
    (run / "train-lora").mkdir(parents=True)
    (run / "train-lora" / "key.json").write_text("")
    (run / "train-lora" / "params.json").write_text("")
    train_stage(first, splits, run)
    assert json.loads((run / "train-lora" / "params.json").read_text())["trainable"] > 0
    (run / "train-lora" / "stage.json").unlink()  # as if killed after its last checkpoint
    checkpoint = run / "train-lora" / "checkpoints" / "step-000002" / "training_state.pt"
    stamp, key = checkpoint.stat().st_mtime_ns, train_key(first)
    other = resolve_system("lora", replace(config, training=replace(config.training, lr=3e-4)))
    train_stage(other, splits, run)
    parked = run / f"train-lora@{key[:8]}"
    assert parked.is_dir() and (parked / checkpoint.relative_to(run / "train-lora")).is_file()
    train_stage(first, splits, run)  # its key again: moved back and resumed, not trained again
    assert json.loads((run / "train-lora" / "stage.json").read_text())["key"] == key
    assert checkpoint.stat().st_mtime_ns == stamp and not parked.exists()


def test_a_longer_test_set_translates_the_test_split_alone(tmp_path):
    """A split's hypothesis key leaves out the other splits' sizes: a change of test size translates the
    test set again and keeps the valid and out-of-domain cells (the first version's one key for all
    splits translated every split again, about 5 min per system on the verdict's sets)."""
    config = zero_shot(tmp_path)
    config = replace(config, data=replace(config.data, test_per_direction=2, valid_per_direction=2))
    run_experiment(config)
    store = HypothesisStore(tmp_path / "run")
    valid, test = store.path("zero-shot", "valid", "en-de"), store.path("zero-shot", "test", "en-de")
    stamps = valid.stat().st_mtime_ns, test.stat().st_mtime_ns
    run_experiment(replace(config, data=replace(config.data, test_per_direction=3)))
    assert valid.stat().st_mtime_ns == stamps[0]  # kept, under the same key
    assert test.stat().st_mtime_ns != stamps[1] and len(hyp_rows(tmp_path, "en-de")) == 1 + 3
