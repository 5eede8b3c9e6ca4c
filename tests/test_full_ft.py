"""Full fine-tuning (methods/full_ft.py): every weight changes after one step (TRL's test), the
trainer runs at lr_scale x training.lr through the pipeline, weights stay float32 on a bf16 config,
and each checkpoint is one safetensors file that resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlas_lora.config import config_from_dict
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.pipeline import train_dir, train_stage
from mlas_lora.experiments.systems import resolve_system
from mlas_lora.methods import METHODS
from mlas_lora.testing.tiny import save_tiny
from mlas_lora.training.trainer import Trainer
from test_pipeline import _write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

DIRECTIONS = ["en-de", "en-fi"]
IDS = torch.tensor([[5, 60, 7, 100, 9, 33], [1, 2, 3, 200, 201, 202]])
METHOD = METHODS["full-ft"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_ft")
    _write_corpus(root / "corpus", DIRECTIONS)
    student = str(save_tiny(root / "student", role="student", seed=2))
    return root, student


def _config(tiny, dtype="float32", training=None, **options):
    root, student = tiny
    return config_from_dict(
        ExperimentConfig,
        {
            "output_dir": str(root / "run"),
            "systems": ["full-ft"],
            "data": {"corpus": str(root / "corpus"), "directions": DIRECTIONS, "seed_per_direction": 4},
            "models": {"teacher": student, "student": student, "dtype": dtype},
            "training": {
                "max_steps": 1,
                "micro_batch": 4,
                "grad_accum": 1,
                "checkpoint_every": 1,
                "lr": 1e-2,
                "warmup_ratio": 0.0,
                **(training or {}),
            },
            "options": options,
        },
    )


def _examples(config):
    splits = load_splits(config.data, ("train",))
    return splits, [e for examples in splits.train.values() for e in examples]


def test_one_step_changes_every_parameter(tiny, tmp_path):
    """TRL's test_train: after training, every trainable parameter has changed; here that is all."""
    config = _config(tiny)
    splits, examples = _examples(config)
    student = METHOD.build(config, DIRECTIONS)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    assert all(p.requires_grad for p in student.model.parameters())
    assert METHOD.trainable_parameters(student) == sum(p.numel() for p in before.values())
    student.model.train()
    Trainer(
        student.model,
        student.tokenizer,
        examples,
        DIRECTIONS,
        METHOD.training_config(config),
        tmp_path,
        None,
        lambda path: METHOD.save(student, path),
        lambda path: METHOD.load(student, path),
        update_norms=METHOD.update_norms(student),
    ).fit(progress=False)
    after = dict(student.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.allclose(p, after[n])]
    assert (
        unchanged == [] and len(before) == 2 * 12 + 2
    )  # 12 per layer; embedding (= the tied head) and final norm
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert 0 < log["history"][0]["update_norm"]["all"] < 1


def test_the_pipeline_trains_at_lr_scale_times_training_lr(tiny):
    config = _config(tiny, training={"max_steps": 4, "checkpoint_every": 4}, lr_scale=0.25)
    assert METHOD.training_config(config).lr == 0.25 * 1e-2 and config.training.lr == 1e-2
    system = resolve_system("full-ft", config)
    splits, _ = _examples(config)
    train_stage(system, splits, tiny[0] / "run")
    history = json.loads((train_dir(system, tiny[0] / "run") / "train_log.json").read_text())["history"]
    assert history[0]["lr"] == pytest.approx(0.25 * 1e-2 * 3 / 4)  # linear decay after step 1 of 4
    assert METHOD.train_key(config, {})["training"]["lr"] == 0.25 * 1e-2
    assert METHOD.train_key(config, {}) != METHOD.train_key(_config(tiny, lr_scale=0.5), {})


def test_weights_are_float32_on_a_bf16_config_unless_asked(tiny):
    kept = METHOD.build(_config(tiny, dtype="bfloat16"), DIRECTIONS).model
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    as_config = METHOD.build(_config(tiny, dtype="bfloat16", weights_dtype="model"), DIRECTIONS).model
    assert {p.dtype for p in as_config.parameters()} == {torch.bfloat16}
    assert len(METHOD.problems(_config(tiny, lr_scale=0.0, weights_dtype="float8"))) == 2


def test_a_checkpoint_is_one_safetensors_file_that_reloads_exactly(tiny, tmp_path):
    config = _config(tiny)
    student = METHOD.build(config, DIRECTIONS)
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        expected = student.model(IDS).logits
    METHOD.save(student, tmp_path / "ckpt")
    assert [f.name for f in (tmp_path / "ckpt").iterdir()] == ["model.safetensors"]
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(saved) == {n for n, _ in student.model.named_parameters()}  # the tied head once
    fresh = METHOD.build(config, DIRECTIONS)
    METHOD.load(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh.model(IDS).logits, expected)
    folder = METHOD.export(student, config, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(exported(IDS).logits, expected)


def test_a_checkpoint_of_another_shape_is_refused_and_nothing_is_copied(tiny, tmp_path):
    """A checkpoint of another student (one tensor reshaped, one renamed) is one error naming the file
    and each difference; the student keeps its weights (the check runs before any copy)."""
    from safetensors.torch import save_file

    from mlas_lora.errors import MlasLoraError

    student = METHOD.build(_config(tiny), DIRECTIONS)
    METHOD.save(student, tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    first, second = sorted(saved)[:2]
    saved[first] = torch.zeros(saved[first].shape[0] + 1, *saved[first].shape[1:])
    saved["renamed.weight"] = saved.pop(second)
    save_file(saved, str(tmp_path / "ckpt" / "model.safetensors"))
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    with pytest.raises(MlasLoraError) as err:
        METHOD.load(student, tmp_path / "ckpt")
    message = str(err.value)
    assert "model.safetensors" in message and f"missing: {second}" in message
    assert "unexpected: renamed.weight" in message and f"shape: {first}" in message
    assert all(torch.equal(p, before[n]) for n, p in student.model.named_parameters())
