"""Hardening, round 2 (issue 25), at the command line and its libraries: NaN configs, a second process
on a run folder, an interrupted export, runaway inputs, OS errors and the issue's low items. Each error
is one `mlas-lora: error:` line with exit code 2."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlas_lora.cli import main
from mlas_lora.config import load_config
from mlas_lora.errors import MlasLoraError, os_error_message
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.run_lock import run_lock
from mlas_lora.testing.tiny import save_tiny, tiny_model, tiny_tokenizer
from test_pipeline import tiny_config

DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"


def one_line_error(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; assert exit 2, one `mlas-lora: error:` line holding `expected`, no traceback."""
    capsys.readouterr()  # what the test printed before (a tiny model's save)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("mlas-lora: error: ") and err.count("\n") == 1, err
    assert all(text in err for text in expected), (expected, err)
    return err


def test_nan_and_inf_are_config_problems_named_by_key(capsys, tmp_path):
    keys = ["lora.teacher_scale=.nan", "training.lr=.inf", "training.epochs=.nan", "generation.length_ratio=.nan",
            "awareness.lam=-.inf"]  # fmt: skip
    with pytest.raises(MlasLoraError) as err:
        load_config(ExperimentConfig, None, keys)
    for key in keys:
        assert f"{key.split('=')[0]}: expected a finite number" in str(err.value)
    fresh = tmp_path / "fresh"
    assert main(["run", str(DEMO), "training.lr=.nan", f"output_dir={fresh}"]) == 2
    assert "training.lr: expected a finite number, got nan" in capsys.readouterr().err
    assert not fresh.exists()  # refused before the run folder is made


def test_training_stops_at_a_non_finite_loss_before_any_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    from mlas_lora.data.records import Example
    from mlas_lora.training.config import TrainingConfig
    from mlas_lora.training.trainer import Trainer

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    examples = [Example("en", "de", f"open file {i}", f"datei {i}") for i in range(8)]
    config = TrainingConfig(lr=1e-3, micro_batch=4, grad_accum=1, max_steps=3, checkpoint_every=1)
    trainer = Trainer(model, tiny_tokenizer(), examples, ["en-de"], config, tmp_path, None, print, print)
    with pytest.raises(MlasLoraError, match="training stopped at step 1: the loss is nan"):
        trainer.fit(progress=False)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_checkpoint_that_cannot_be_written_is_one_error_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    import mlas_lora.training.trainer as trainer_module
    from mlas_lora.data.records import Example
    from mlas_lora.training.config import TrainingConfig

    def full_disk(*args, **kwargs):  # what torch.save raises on a full disk: no file named
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    examples = [Example("en", "de", f"open file {i}", f"datei {i}") for i in range(8)]
    config = TrainingConfig(lr=1e-3, micro_batch=4, grad_accum=1, max_steps=2, checkpoint_every=1)
    save = lambda path: model.save_pretrained(str(path))  # noqa: E731
    trainer = trainer_module.Trainer(
        model, tiny_tokenizer(), examples, ["en-de"], config, tmp_path, None, save, print
    )
    monkeypatch.setattr(trainer_module.torch, "save", full_disk)
    with pytest.raises(MlasLoraError, match="step-000001.tmp: the checkpoint of step 1 could not be written"):
        trainer.fit(progress=False)
    assert list((tmp_path / "checkpoints").iterdir()) == []


HOLDER = """
import sys
from mlas_lora.run_lock import run_lock
with run_lock(sys.argv[1], "mlas-lora train holder.yaml"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_on_a_run_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    config = tiny_config(tmp_path)
    run = Path(config.output_dir)
    run.mkdir()
    (run / "hyps").mkdir()
    (run / "hyps" / "kept.jsonl").write_text("{}\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        yaml = tmp_path / "tiny.yaml"
        yaml.write_text(json.dumps({"output_dir": str(run), "systems": ["zero-shot"],
                                    "data": {"corpus": str(tmp_path / "corpus"), "directions": ["en-de"]},
                                    "models": {"student": config.models.student}}))  # fmt: skip
        for command in (["run"], ["train"], ["curve"], ["experiment", "tiny"]):  # tiny.yaml's own systems
            one_line_error(capsys, [command[0], *command[1:], str(yaml)], f"{run} is in use by process "
                           f"{holder.pid} (mlas-lora train holder.yaml, since ")  # fmt: skip
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    finally:
        holder.communicate("")
    with run_lock(run):  # released when its holder ended
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        with run_lock(run):  # the same process may take it again (an analysis running experiments)
            pass


def test_an_interrupted_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from mlas_lora.experiments.data import load_splits
    from mlas_lora.experiments.pipeline import export_stage, initial_student
    from mlas_lora.experiments.systems import resolve_system
    from mlas_lora.stage_files import restore_dir

    config = tiny_config(tmp_path)
    run, system = Path(config.output_dir), resolve_system("lora", config)
    student = initial_student(system, load_splits(config.data, ("train", "dev")), run)
    folder = export_stage(system, student, run)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed(student, config, folder, merge):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(system.method, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        export_stage(system, student, run)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    monkeypatch.undo()
    folder.rename(run / ".adapters-lora.old")  # a kill between the swap's two renames
    restore_dir(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert export_stage(system, student, run) == folder
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".adapters")) == []


def test_a_runaway_source_segment_is_cut_before_decoding():
    from mlas_lora.translation.generate import (
        MAX_SOURCE_TOKENS,
        GenerationConfig,
        TranslationRequest,
        bounded_request,
        translate,
    )

    tokenizer, model = tiny_tokenizer(), tiny_model()
    short = TranslationRequest("en", "de", "open the file")
    assert bounded_request(tokenizer, short) is short
    long = TranslationRequest("en", "de", "a" * 100_000)  # 100k byte tokens: 160 GB of eager attention
    assert bounded_request(tokenizer, long).source == "a" * MAX_SOURCE_TOKENS
    widths = []
    model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    hyps = translate(model, tokenizer, [long, short], GenerationConfig(max_new_tokens=2), progress=False)
    assert len(hyps) == 2 and max(widths) < MAX_SOURCE_TOKENS + 64


def test_a_crafted_rank_is_refused_before_anything_is_allocated(tmp_path):
    from mlas_lora.adapters.export import load_routed, save_routed
    from mlas_lora.adapters.routed_lora import attach_routed_lora

    save_routed(attach_routed_lora(tiny_model(), ["en-de", "en-fi"], r_gen=4, r_spe=4), tmp_path)
    manifest = json.loads((tmp_path / "routed_lora.json").read_text())
    for change, problem in (
        ({"r_gen": 100_000_000}, "rank r_gen \\+ r_spe = 100000004 exceeds the model's smallest"),
        ({"pairs": [f"en-x{i}" for i in range(1000)]}, "asks for .* LoRA numbers but .* holds"),
    ):
        crafted = tmp_path / str(len(problem))
        crafted.mkdir()
        (crafted / "routed_lora.safetensors").write_bytes((tmp_path / "routed_lora.safetensors").read_bytes())
        (crafted / "routed_lora.json").write_text(
            json.dumps({**manifest, "config": {**manifest["config"], **change}})
        )
        with pytest.raises(MlasLoraError, match=problem):
            load_routed(tiny_model(), crafted)
    load_routed(tiny_model(), tmp_path)


def test_scores_taken_in_chunks_are_sacrebleus_corpus_scores():
    """Chunked statistics (bounded memory on a 50 MB file) add up to the same integers."""
    import random

    from mlas_lora.evaluation.metrics import sacrebleu_metric, sacrebleu_score

    rng = random.Random(0)
    words = ["Datei", "öffnen", "Tabelle", "speichern", "Zelle", "Blatt", "drucken", "."]
    hyps, refs = ([" ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in range(53)] for _ in "hr")
    for metric in ("bleu", "chrf"):
        whole = sacrebleu_metric(metric, "de").corpus_score(hyps, [refs]).score
        assert sacrebleu_score(metric, hyps, refs, "de", chunk=7).score == whole


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    from mlas_lora.stage_files import write_text_atomic

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(
        capsys, ["run", str(DEMO), f"output_dir={blocker}/run"], f"{blocker}", "a file is in the way"
    )
    long = tmp_path / ("n" * 300)
    one_line_error(capsys, ["run", str(DEMO), f"output_dir={long}"], "a file name too long")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("the cat sat\n")
    scoring = ["evaluate", "--hyp", str(hyp), "--ref", str(hyp), "--lang", "en", "--metrics", "bleu"]
    one_line_error(capsys, [*scoring, "--json", "."], "--json .: is a folder")
    one_line_error(capsys, [*scoring, "--json", f"{blocker}/out.json"], f"{blocker} is a file, not a folder")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # a failed write names no file

    monkeypatch.setattr(Path, "write_text", full_disk)
    one_line_error(
        capsys, [*scoring, "--json", str(tmp_path / "out.json")], f"{tmp_path / 'out.json'}: no space"
    )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "hyp.txt"]  # nothing half-written
    with pytest.raises(OSError) as err:
        monkeypatch.setattr(Path, "write_text", full_disk)
        write_text_atomic(tmp_path / "x.json", "{}")
    assert err.value.filename == str(tmp_path / "x.json") and err.value.errno == errno.ENOSPC
    read_only = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")
    assert (
        os_error_message(read_only)
        == "/mnt/ro/run: on a read-only file system: choose a writable folder (output_dir)"
    )


def test_a_model_folder_holding_only_a_foreign_pickle_is_refused(tmp_path, capsys):
    import pickle

    folder = save_tiny(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": print}, handle)  # more than tensors: torch.load(weights_only) refuses it
    one_line_error(capsys, ["translate", "--model", str(folder), "--pair", "en-de", "--text", "x"],
                   "its weights are a pickle")  # fmt: skip


def test_low_items(tmp_path, capsys):
    from mlas_lora.data.readers import fill_template
    from mlas_lora.experiments.data import corpus_spec
    from mlas_lora.experiments.systems import resolve_systems
    from mlas_lora.languages import Direction

    assert load_config(ExperimentConfig, None, ["output_dir=~/x"]).output_dir == os.path.expanduser("~/x")
    for overrides, problem in (
        (["output_dir="], "output_dir is empty"),
        (["data.corpus=data/{foo}"], "data.corpus: template 'data/{foo}': unknown field(s) {foo}"),
        (["data.corpus=hf:{0}"], "unknown field(s) {0}"),
        (["data.test_corpus=x/{split"], "data.test_corpus: template 'x/{split': expected '}'"),
    ):
        with pytest.raises(
            MlasLoraError, match=problem.replace("(", "\\(").replace(")", "\\)").replace("{", "\\{")
        ):
            load_config(ExperimentConfig, None, overrides)
    dotted = load_config(ExperimentConfig, None, ["systems=[zero-shot, {name: .., method: in-context}]"])
    with pytest.raises(MlasLoraError, match="system name '..' is a folder's own name"):
        resolve_systems(dotted)
    config = load_config(ExperimentConfig, None, ["data.corpus=hf:wmt18:{xx}-en:{split}"])
    assert corpus_spec(Direction.parse("de-en"), "test", config.data) == "hf:wmt18:de-en:test"
    with pytest.raises(MlasLoraError, match="unknown field"):
        fill_template("{src.__class__}", src="en", tgt="de", xx="de", split="test")  # never evaluated
    one_line_error(capsys, ["experiment", "..", str(DEMO)], "experiment name '..'")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("the cat sat\n")
    scoring = ["evaluate", "--hyp", str(hyp), "--ref", str(hyp), "--lang", "en"]
    one_line_error(capsys, [*scoring, "--metrics", ","], "--metrics ',' names no metric")
    ckpt = tmp_path / "broken.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    one_line_error(capsys, [*scoring, "--metrics", "bleu,comet", "--comet-model", str(ckpt), "--src", str(hyp)],
                   "COMET")  # fmt: skip
    secret = tmp_path / "secret.yaml"
    secret.write_text("password: hunter2: x\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {secret}\n")
    err = one_line_error(capsys, ["run", str(child)], f"{secret}:1:", "not valid YAML")
    assert "hunter2" not in err
