"""AFLoRA (methods/aflora.py): starts at the base model, freezes A / B matrices on the cubic schedule
(the count of trainable ones never rises), a frozen matrix never changes again, resume equals an
uninterrupted run, and the export is a PEFT LoRA giving the same logits."""

import json

import pytest
import torch
from peft import PeftModel

from mlas_lora.adapters.wrapped import adapter_state, export_peft
from mlas_lora.config import config_from_dict
from mlas_lora.data.records import Example
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods import METHODS
from mlas_lora.methods.aflora import (
    AFLoRAStudent,
    FreezeSchedule,
    aflora_layers,
    aflora_settings,
    attach_aflora,
    freeze_step,
    trainable_budget,
    trainable_matrices,
)
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 60, 7, 100, 9, 33], [1, 2, 3, 200, 201, 202]])
PAIRS = ["en-de", "en-fi"]
EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)] + [
    Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(8)
]
N_MATRICES = 2 * 7 * 2  # layers x projections x (A, B) of the tiny student
METHOD = METHODS["aflora"]


def student(schedule: FreezeSchedule, r: int = 3) -> AFLoRAStudent:
    torch.manual_seed(0)
    model = tiny_model()
    attach_aflora(model, PROJECTIONS, r, scaling=2.0)
    return AFLoRAStudent(model, tiny_tokenizer(), schedule)


def train(out_dir, schedule, steps, stop_after=None, watch=None, weight_decay=0.0) -> AFLoRAStudent:
    """`steps` optimizer steps through the Trainer, which calls `after_step` (then `watch`) each step."""
    trained = student(schedule)

    def after_step(step, total):
        METHOD.after_step(trained, step, total)
        if watch is not None:
            watch(trained, step)

    config = TrainingConfig(
        lr=1e-2, micro_batch=4, grad_accum=1, max_steps=steps, checkpoint_every=1, weight_decay=weight_decay
    )
    trainer = Trainer(
        trained.model, trained.tokenizer, EXAMPLES, PAIRS, config, out_dir, None,
        lambda path: METHOD.save(trained, path), lambda path: METHOD.load(trained, path),
        after_step=after_step,
    )  # fmt: skip
    trainer.fit(progress=False, stop_after=stop_after)
    return trained


def test_starts_at_the_base_model_bitwise():
    base, ours = tiny_model(), student(FreezeSchedule()).model
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, base(IDS).logits)
    layer = next(iter(aflora_layers(ours).values()))
    assert torch.equal(layer.lambda_d, torch.full((3,), 0.1)) and not layer.lambda_b.any()
    assert layer.A.abs().min() > 0 and layer.B.abs().min() > 0  # both factors random (kaiming)


def test_cubic_budget_by_hand():
    # t_i = 2, t_f = 3, T = 10: the cubic runs over steps 3..6 with denominator 5
    budgets = [trainable_budget(28, t, 10, 2, 3) for t in range(1, 11)]
    assert budgets == [
        28,
        28,
        14,
        6,
        1,
        0,
        0,
        0,
        0,
        0,
    ]  # 28 * 0.8^3 = 14.3, 28 * 0.6^3 = 6.0, 28 * 0.4^3 = 1.8
    assert [trainable_budget(28, t, 4, 2, 2) for t in range(1, 5)] == [28, 28, 0, 0]  # no cubic span
    assert FreezeSchedule(initial=0.2, final=0.3).warmups(10) == (2, 3)


def test_trainable_count_follows_the_schedule_and_frozen_matrices_never_change(tmp_path):
    schedule = FreezeSchedule(initial=0.2, final=0.3)
    counts, frozen, moved = [], {}, set()
    start = {}

    def watch(trained, step):
        layers = aflora_layers(trained.model)
        if not start:
            start.update(
                {(p, m): getattr(layer, m).detach().clone() for p, layer in layers.items() for m in "AB"}
            )
        counts.append(len(trainable_matrices(trained.model)))
        for (path, name), value in frozen.items():
            assert torch.equal(getattr(layers[path], name), value), (path, name, step)
        for path, layer in layers.items():
            for name, at in layer.frozen_at.items():
                if (path, name) not in frozen:
                    assert at == step and not getattr(layer, name).requires_grad
                    frozen[(path, name)] = getattr(layer, name).detach().clone()
                    if not torch.equal(frozen[(path, name)], start[(path, name)]):
                        moved.add((path, name))

    trained = train(tmp_path, schedule, 10, watch=watch, weight_decay=0.1)
    assert counts == [trainable_budget(N_MATRICES, t, 10, 2, 3) for t in range(1, 11)]
    assert counts == [28, 28, 14, 6, 1, 0, 0, 0, 0, 0]
    assert len(frozen) == N_MATRICES and moved  # matrices trained before they froze
    layer = next(iter(aflora_layers(trained.model).values()))
    assert layer.lambda_b.requires_grad and layer.lambda_b.any()  # the vectors train to the end


def test_the_lowest_scores_freeze_first():
    model = student(FreezeSchedule()).model
    layers = aflora_layers(model)
    scores = torch.randperm(N_MATRICES).tolist()
    with torch.no_grad():
        for (path, name), score in zip(trainable_matrices(model), scores, strict=True):
            getattr(layers[path], f"ipt_{name}").fill_(float(score))
            getattr(layers[path], f"unc_{name}").fill_(2.0)  # score = mean(Ibar * Ubar) = 2 * score
    order = sorted(trainable_matrices(model), key=lambda m: layers[m[0]].score(m[1]))
    assert [layers[p].score(m) for p, m in order] == [2.0 * s for s in range(N_MATRICES)]
    frozen = freeze_step(model, FreezeSchedule(initial=0.0, final=0.0), 1, 2)  # k(1) = int(28 / 8) = 3
    assert frozen == order[:25] and set(trainable_matrices(model)) == set(order[25:])
    assert freeze_step(model, FreezeSchedule(initial=0.0, final=0.0), 2, 2) == order[25:]
    assert trainable_matrices(model) == []


def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path):
    schedule = FreezeSchedule(initial=1 / 12, final=2 / 12)  # T = 12: t_i = 1, t_f = 2, cubic over 2..9
    straight = train(tmp_path / "a", schedule, 12)
    train(tmp_path / "b", schedule, 12, stop_after=3)
    saved = json.loads(
        (tmp_path / "b" / "checkpoints" / "step-000003" / "adapters" / "freezing.json").read_text()
    )
    assert sum(len(m) for m in saved["frozen_at"].values()) == N_MATRICES - 13  # k(3) = int(28 (7/9)^3)
    resumed = train(tmp_path / "b", schedule, 12)
    ours, theirs = adapter_state(straight.model), adapter_state(resumed.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    scores, resumed_scores = dict(straight.model.named_buffers()), dict(resumed.model.named_buffers())
    assert sum(".ipt_" in k or ".unc_" in k for k in scores) == 2 * N_MATRICES
    assert all(torch.equal(scores[k], resumed_scores[k]) for k in scores)  # the smoothed scores too
    frozen = {p: layer.frozen_at for p, layer in aflora_layers(straight.model).items()}
    assert frozen == {p: layer.frozen_at for p, layer in aflora_layers(resumed.model).items()}
    assert sorted(at for by in frozen.values() for at in by.values()) == sorted(
        t
        for t in range(2, 9)
        for _ in range(trainable_budget(28, t - 1, 12, 1, 2) - trainable_budget(28, t, 12, 1, 2))
    )  # 9 at step 2, 6 at 3, 5 at 4, 4 at 5, 2 at 6, 1 at 7, 1 at 8


def test_export_folds_the_vectors_into_a_peft_lora_with_the_same_logits(tmp_path):
    model = student(FreezeSchedule(), r=5).model
    with torch.no_grad():
        for layer in aflora_layers(model).values():
            layer.lambda_b.normal_(0, 0.1)
            layer.lambda_d.normal_(0, 1.0)
        ours = model(IDS).logits
    folder = export_peft(model, tmp_path / "aflora", "tiny")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8  # 5, padded for vLLM
    peft = PeftModel.from_pretrained(tiny_model(), str(folder)).eval()
    with torch.no_grad():
        theirs = peft(IDS).logits
    assert not torch.allclose(theirs, tiny_model()(IDS).logits)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_default_rank_matches_mlas_lora_and_options_are_checked():
    config = config_from_dict(ExperimentConfig, {"lora": {"r_gen": 4, "r_spe": 4}})
    r, scaling, schedule = aflora_settings(config, 2)
    assert (r, scaling, schedule) == (12, 4.0, FreezeSchedule(0.05, 0.7, 0.85, 0.95, "gradient"))
    config.options = {"r": 4, "alpha": 1.0}
    assert aflora_settings(config, 2)[:2] == (4, 0.5)  # AFLoRA's GLUE setting: alpha / sqrt(r)
    config.options = {"initial": 0.5, "final": 0.6, "sensitivity": "fisher"}
    (problem,) = METHOD.problems(config)
    assert "sum <= 1" in problem and "'fisher'" in problem
    # r (in + out) + r + out per projection: 12 * 1024 + 12 * 14 + 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    config.options = {}
    assert METHOD.trainable_parameters(student(FreezeSchedule(), r=12)) == 12 * 1024 + 168 + 512
