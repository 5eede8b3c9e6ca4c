"""Fail fast: every model a command will load is opened (config only) before its first stage, COMET
asked for without a checkpoint is a config problem, and a run refused so leaves no output folder."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from mlas_lora.cli import main
from mlas_lora.config import load_config
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.systems import comet_problems, resolve_systems
from mlas_lora.models import loading
from mlas_lora.testing.tiny import save_tiny
from test_pipeline import _write_corpus

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail-fast")
    _write_corpus(root / "corpus", ["en-de", "de-en"])
    gpt2 = root / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2).save_pretrained(gpt2)
    return {
        "root": root,
        "teacher": save_tiny(root / "teacher", role="teacher", seed=1),
        "student": save_tiny(root / "student", role="student", seed=2),
        "gpt2": gpt2,
    }


def _config(models, tmp_path, systems: str, **changes) -> Path:
    """A tiny run config in tmp_path; `changes` replace its models (teacher=..., student=...)."""
    chosen = {"teacher": models["teacher"], "student": models["student"], **changes}
    path = tmp_path / "c.yaml"
    path.write_text(f"""
output_dir: {tmp_path / "run"}
systems: [{systems}]
data: {{corpus: {models["root"] / "corpus"}, directions: [en-de, de-en], seed_per_direction: 4}}
models: {{teacher: {chosen["teacher"]}, student: {chosen["student"]}, dtype: float32}}
generation: {{batch_size: 4, max_new_tokens: 3}}
lora: {{r_gen: 4, r_spe: 4}}
training: {{max_steps: 1, micro_batch: 4, grad_accum: 1}}
""")
    return path


@pytest.fixture
def no_stage(monkeypatch):
    """Any model loaded (a stage started) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a stage loaded a model before the config was refused")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("command", ["run", "train", "score", "experiment table1", "experiment pairs"])
def test_a_mistyped_teacher_stops_the_command_before_any_stage(command, models, tmp_path, capsys, no_stage):
    missing = tmp_path / "no-such-teacher"
    path = _config(models, tmp_path, "zero-shot, mlas-lora", teacher=missing)
    assert main([*command.split(), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"mlas-lora: error: invalid config: models.teacher: model path '{missing}' is not a checkpoint "
        "directory: not found"
    )
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_an_unsupported_student_is_a_config_problem(models, tmp_path, capsys, no_stage):
    path = _config(models, tmp_path, "zero-shot", student=models["gpt2"])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"models.student: '{models['gpt2']}': unsupported architecture 'gpt2'" in err
    assert not (tmp_path / "run").exists()


def test_only_the_models_a_command_needs_are_opened(models, tmp_path):
    path = _config(models, tmp_path, "zero-shot, lora", teacher=tmp_path / "no-such-teacher")
    config = load_config(ExperimentConfig, path)
    assert [s.name for s in resolve_systems(config, open_models=("models", "comet"))] == ["zero-shot", "lora"]
    with pytest.raises(MlasLoraError, match="models.teacher: model path"):
        resolve_systems(config, open_models=("models", "teacher"))  # the teacher stages load it
    teacher_system = load_config(ExperimentConfig, path, ["systems=[teacher]"])
    with pytest.raises(MlasLoraError, match="models.teacher: model path"):
        resolve_systems(teacher_system, open_models=("models",))  # the teacher translates
    resolve_systems(teacher_system)  # checking a config alone opens nothing it cannot


def test_comet_without_a_model_is_a_config_problem_with_the_others():
    with pytest.raises(MlasLoraError) as err:
        load_config(ExperimentConfig, None, ["evaluation.metrics=[bleu, comet]", "lora.init_mode=x"])
    message = str(err.value)
    assert "evaluation.metrics asks for comet but evaluation.comet_model is not set" in message
    assert "lora.init_mode: 'x'" in message


def test_a_comet_checkpoint_that_is_not_there_stops_the_run(models, tmp_path, capsys, no_stage):
    path = _config(models, tmp_path, "zero-shot")
    overrides = ["evaluation.metrics=[bleu, comet]", f"evaluation.comet_model={tmp_path / 'comet'}"]
    assert main(["run", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert f"evaluation.comet_model: no COMET checkpoint at {tmp_path / 'comet'}" in err
    assert not (tmp_path / "run").exists()


def test_the_paper_config_names_its_comet_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the placeholder is relative: not there
    config = load_config(ExperimentConfig, CONFIGS / "paper-wmt18.yaml")
    assert "comet" in config.evaluation.metrics and config.evaluation.comet_model
    assert comet_problems(config) == [
        "evaluation.comet_model: no COMET checkpoint at models/wmt22-comet-da (expected a .ckpt file or a "
        "folder with checkpoints/model.ckpt)"
    ]
