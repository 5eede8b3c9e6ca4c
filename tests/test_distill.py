"""Token-level distillation (training/distill.py): the divergences against float64 references, the
loss at weight 0 against cross-entropy bit for bit, and a trainer that trains the student only."""

import math

import pytest
import torch

from mlas_lora.training.config import DistillConfig, TrainingConfig
from mlas_lora.training.distill import TokenDivergence, distill_loss
from mlas_lora.training.loss import IGNORE, target_loss


def reference_divergence(student, teacher, config: DistillConfig) -> torch.Tensor:
    """Per-row divergence in float64, written out from the definitions (no shared helper)."""
    q = torch.softmax(student.double() / config.temperature, -1)
    p = torch.softmax(teacher.double() / config.temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if config.divergence == "forward_kl":
        return kl(p, q)
    if config.divergence == "reverse_kl":
        return kl(q, p)
    m = config.beta * p + (1 - config.beta) * q
    return config.beta * kl(p, m) + (1 - config.beta) * kl(q, m)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_equals_a_float64_reference_at_temperature_2(divergence):
    torch.manual_seed(0)
    student, teacher = torch.randn(40, 13) * 3, torch.randn(40, 13) * 3  # 40 rows: two chunks
    config = DistillConfig(weight=0.5, temperature=2.0, divergence=divergence, beta=0.3)
    got = TokenDivergence.apply(student, teacher, config)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), reference_divergence(student, teacher, config), rtol=1e-5, atol=1e-6
    )
    wide = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: TokenDivergence.apply(x, teacher.double(), config), (wide,))


def test_jsd_at_beta_0_and_1_is_forward_and_reverse_kl():
    torch.manual_seed(1)
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = TokenDivergence.apply(student, teacher, DistillConfig(1.0, 1.5, "jsd", beta))
        torch.testing.assert_close(
            jsd, TokenDivergence.apply(student, teacher, DistillConfig(1.0, 1.5, same))
        )


def test_forward_kl_by_hand():
    """Two target tokens over a 2-word vocabulary, T = 1: KL(p || q) = sum p log(p / q), averaged."""
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # q = (1/2, 1/2), (3/4, 1/4)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4), (1/2, 1/2)
    labels = torch.tensor([[IGNORE, 0, 1]])
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    ce = (math.log(2.0) + math.log(4.0)) / 2  # -log q(label): 1/2, then 1/4
    loss, sums, counts = distill_loss(student, teacher, labels, DistillConfig(weight=0.25))
    assert loss.item() == pytest.approx(0.75 * ce + 0.25 * (kl_1 + kl_2) / 2, abs=1e-6)
    assert sums.tolist() == pytest.approx([2 * ce]) and counts.tolist() == [2]  # the log shows the CE


def _batch(seed=0):
    torch.manual_seed(seed)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 3, 8], [IGNORE, 4, 2, IGNORE, IGNORE]])
    rows = int((labels[:, 1:] != IGNORE).sum())
    return torch.randn(rows, 11).to(torch.bfloat16), torch.randn(rows, 11).to(torch.bfloat16), labels


def test_weight_0_is_cross_entropy_bit_for_bit():
    student, teacher, labels = _batch()
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    plain, plain_sums, _ = target_loss(a, labels)
    mixed, mixed_sums, _ = distill_loss(b, teacher, labels, DistillConfig(weight=0.0, temperature=3.0))
    plain.backward()
    mixed.backward()
    assert torch.equal(plain, mixed) and torch.equal(plain_sums, mixed_sums) and torch.equal(a.grad, b.grad)


def test_a_student_equal_to_its_teacher_has_zero_divergence_and_scaled_ce_gradients():
    student, _, labels = _batch(1)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        config = DistillConfig(weight=0.4, temperature=2.0, divergence=divergence)
        a, b = student.float().requires_grad_(True), student.float().requires_grad_(True)
        assert TokenDivergence.apply(a, a.detach(), config).abs().max() < 1e-6
        mixed = distill_loss(a, a.detach(), labels, config)[0]
        plain = target_loss(b, labels)[0]
        mixed.backward()
        plain.backward()
        torch.testing.assert_close(mixed, 0.6 * plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.grad, 0.6 * b.grad, rtol=1e-5, atol=1e-7)


def test_distill_settings_enter_the_training_key_only_when_on():
    off = TrainingConfig(distill=DistillConfig(weight=0.0, temperature=4.0))
    assert off.key_settings() == TrainingConfig().key_settings()
    assert "distill" not in TrainingConfig().key_settings()
    on = TrainingConfig(distill=DistillConfig(weight=0.5))
    assert on.key_settings()["distill"] == {
        "weight": 0.5,
        "temperature": 1.0,
        "divergence": "forward_kl",
        "beta": 0.5,
    }


def test_bad_distill_settings_are_one_error():
    from mlas_lora.config import config_from_dict
    from mlas_lora.errors import MlasLoraError

    with pytest.raises(MlasLoraError) as err:
        config_from_dict(TrainingConfig, {"distill": {"weight": 1.5, "temperature": 0, "divergence": "kl"}})
    for part in ("distill.weight must be in [0, 1]", "temperature must be > 0", "'kl' (known: forward_kl"):
        assert part in str(err.value)


def _train(out_dir, distill: DistillConfig, teacher):
    """Two steps of a PEFT LoRA on the tiny student; returns (model, result)."""
    from peft import LoraConfig, get_peft_model

    from mlas_lora.data.records import Example
    from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
    from mlas_lora.training.trainer import Trainer

    examples = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)]
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )
    config = TrainingConfig(
        lr=1e-2, micro_batch=4, grad_accum=1, max_steps=2, checkpoint_every=2, distill=distill
    )
    trainer = Trainer(
        model,
        tiny_tokenizer(),
        examples,
        ["en-de"],
        config,
        out_dir,
        None,
        lambda p: None,
        lambda p: None,
        teacher=teacher,
    )
    return model, trainer.fit(progress=False)


def test_the_trainer_distils_into_the_student_only(tmp_path):
    from mlas_lora.testing.tiny import tiny_model

    teacher = tiny_model(role="teacher", seed=1).to(torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain_model, plain = _train(tmp_path / "plain", DistillConfig(), None)
    off_model, off = _train(tmp_path / "off", DistillConfig(weight=0.0), teacher)  # weight 0: CE alone
    assert [r["loss"] for r in off.history] == [r["loss"] for r in plain.history]
    on_model, on = _train(tmp_path / "on", DistillConfig(weight=0.5, temperature=2.0), teacher)
    assert [r["loss"] for r in on.history][0] != plain.history[0]["loss"]
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    trained = {n: p for n, p in on_model.named_parameters() if p.requires_grad}
    moved = {n: p for n, p in plain_model.named_parameters() if p.requires_grad}
    assert trained and any(not torch.equal(trained[n], moved[n]) for n in trained)
    assert on.peak_rss_mb is None or on.peak_rss_mb > 0
    assert "peak_rss_mb" in (tmp_path / "on" / "train_log.json").read_text()
