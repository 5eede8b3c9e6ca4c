"""AFLoRA (methods/aflora.py): starts at the base model, freezes A / B matrices on the official LLM
schedule and threshold rule (the count of trainable ones never rises), a frozen matrix never changes
again, resume equals an uninterrupted run, and the export is a PEFT LoRA giving the same logits."""

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


def official_remaining(step, total, initial=0.3, final=0.3, delta_t=10):
    """The official `schedule_threshold_comb` (zeyuliu1037/AFLoRA gsm8k/utils.py:203-227) as written there."""
    warmup_steps = total
    if step <= initial * warmup_steps:
        return 1, False
    elif step > (total - final * warmup_steps):
        return 0.0, True
    spars_warmup_steps = initial * warmup_steps
    spars_schedu_steps = (final + initial) * warmup_steps
    mul_coeff = (step - spars_warmup_steps) / (total - spars_schedu_steps)
    return 1 - (mul_coeff**2), step % delta_t == 0


@pytest.mark.parametrize("total", [48, 480])
def test_the_default_schedule_is_the_official_llm_one(total):
    schedule = FreezeSchedule()
    ours = [schedule.remaining(t, total) for t in range(1, total + 1)]
    assert ours == [official_remaining(t, total) for t in range(1, total + 1)]
    checks = [t for t, (_, check) in enumerate(ours, start=1) if check]
    if total == 48:  # t_i = 14.4, T - t_f = 33.6: checks at 20 and 30, then every step from 34
        assert checks == [20, 30, *range(34, 49)]
        assert ours[19][0] == pytest.approx(1 - (5.6 / 19.2) ** 2) and ours[33] == (0.0, True)
    else:  # t_i = 144, T - t_f = 336
        assert checks == [*range(150, 331, 10), *range(337, 481)]
        assert ours[149][0] == pytest.approx(1 - (6 / 192) ** 2) and ours[336] == (0.0, True)
    assert all(rho == 1 for rho, _ in ours[: int(0.3 * total)])


def test_the_glue_cola_schedule_stays_reachable_and_is_cubic():
    # glue/utils.py:236-258, CoLA: 1 and 14 of 20 epochs; T = 20: t_i = 1, T - t_f = 6, x = (t - 1) / 5
    schedule = FreezeSchedule(initial=0.05, final=0.7, shape="cubic", every=1)
    assert [schedule.remaining(t, 20) for t in range(1, 8)] == [
        (1.0, False),
        *[(pytest.approx((1 - (t - 1) / 5) ** 3), True) for t in range(2, 7)],
        (0.0, True),
    ]


def test_the_threshold_rule_freezes_matrices_whose_mean_is_below_the_kth_entry():
    model = student(FreezeSchedule()).model
    layers = aflora_layers(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, (path, name) in enumerate(trainable_matrices(model)):
            scale = 1 + (i * 7) % N_MATRICES  # matrices differ in scale, entries within one vary
            getattr(layers[path], f"ipt_{name}").copy_(
                torch.rand(getattr(layers[path], name).shape, generator=generator) * scale
            )
            getattr(layers[path], f"unc_{name}").fill_(0.5)
    matrices = trainable_matrices(model)
    entries = torch.cat(
        [(layers[p].ipt_A if m == "A" else layers[p].ipt_B).flatten() * 0.5 for p, m in matrices]
    )
    schedule = FreezeSchedule(initial=0.0, final=0.0, every=1)
    rho = schedule.remaining(5, 10)[0]  # 1 - 0.5^2 = 0.75
    cut = entries.sort().values[int(entries.numel() * (1 - rho)) - 1]
    expected = [m for m in matrices if layers[m[0]].score(m[1]) < cut]
    assert 0 < len(expected) < N_MATRICES
    assert freeze_step(model, schedule, 5, 10) == expected
    assert set(trainable_matrices(model)) == set(matrices) - set(expected)
    assert freeze_step(model, schedule, 1, 1000) == []  # k = int(n (1 - rho)) = int(n / 1e6) = 0
    assert freeze_step(model, schedule, 10, 10) == [m for m in matrices if m not in expected]  # rho = 0: all
    assert trainable_matrices(model) == []


def test_no_matrix_freezes_before_t_i_or_between_checks(tmp_path):
    schedule = FreezeSchedule(initial=0.25, final=0.25, every=2)  # T = 16: checks 6, 8, 10, 12 (rho 0)
    counts, frozen, moved, start = [], {}, set(), {}

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

    trained = train(tmp_path, schedule, 16, watch=watch, weight_decay=0.1)
    assert counts[:5] == [N_MATRICES] * 5 and counts[12:] == [0] * 4
    assert {
        step for step in range(1, 17) if counts[step - 1] < (counts[step - 2] if step > 1 else N_MATRICES)
    } <= {6, 8, 10, 12}
    assert N_MATRICES > counts[7] > counts[9] > 0  # the checks at 8 and 10 froze some, not all
    assert len(frozen) == N_MATRICES and moved  # matrices trained before they froze
    layer = next(iter(aflora_layers(trained.model).values()))
    assert layer.lambda_b.requires_grad and layer.lambda_b.any()  # the vectors train to the end


def test_resume_mid_window_equals_an_uninterrupted_run(tmp_path):
    schedule = FreezeSchedule(initial=0.25, final=0.25, every=2)  # T = 12: checks at 4, 6, 8; all at 10
    straight = train(tmp_path / "a", schedule, 12)
    train(tmp_path / "b", schedule, 12, stop_after=5)  # step 5 opens a window
    saved = json.loads(
        (tmp_path / "b" / "checkpoints" / "step-000005" / "adapters" / "freezing.json").read_text()
    )
    assert all(at == 4 for by in saved["frozen_at"].values() for at in by.values())
    resumed = train(tmp_path / "b", schedule, 12)
    ours, theirs = adapter_state(straight.model), adapter_state(resumed.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    scores, resumed_scores = dict(straight.model.named_buffers()), dict(resumed.model.named_buffers())
    assert sum(k.rsplit(".", 1)[-1][:4] in ("win_", "ipt_", "unc_") for k in scores) == 3 * N_MATRICES
    assert all(torch.equal(scores[k], resumed_scores[k]) for k in scores)  # windows and scores too
    frozen = {p: layer.frozen_at for p, layer in aflora_layers(straight.model).items()}
    assert frozen == {p: layer.frozen_at for p, layer in aflora_layers(resumed.model).items()}
    steps = sorted(at for by in frozen.values() for at in by.values())
    assert len(steps) == N_MATRICES and set(steps) <= {4, 6, 8, 10} and steps[-1] == 10


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


def test_defaults_are_the_official_llm_setting_and_options_are_checked():
    config = config_from_dict(ExperimentConfig, {"lora": {"r_gen": 4, "r_spe": 4}})
    r, scaling, schedule = aflora_settings(config, 2)
    assert (r, scaling, schedule) == (
        12,
        4.0,
        FreezeSchedule(0.3, 0.3, "quadratic", 10, 0.85, 0.95, "gradient"),
    )
    assert METHOD.training_config(config).lr == 2e-3 != config.training.lr  # the official lr
    assert METHOD.train_key(config, {})["training"]["lr"] == 2e-3
    config.options = {"r": 4, "alpha": 8.0, "lr": 5e-4}
    assert aflora_settings(config, 2)[:2] == (4, 2.0)  # the LLM code: alpha / r
    assert METHOD.training_config(config).lr == 5e-4  # an lr grid sets options.lr
    config.options = {"initial": 0.5, "final": 0.6, "sensitivity": "fisher", "shape": "linear", "every": 0}
    (problem,) = METHOD.problems(config)
    assert "sum <= 1" in problem and "'fisher'" in problem and "'linear'" in problem and "every" in problem
    # r (in + out) + r + out per projection: 12 * 1024 + 12 * 14 + 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    config.options = {}
    assert METHOD.trainable_parameters(student(FreezeSchedule(), r=12)) == 12 * 1024 + 168 + 512
