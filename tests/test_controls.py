"""The verdict's controls and rows: PiSSA (the student's own SVD, one shared LoRA), mlas-pissa
(MLAS-LoRA's structure from the student's own SVD), LoRA at MLAS-LoRA's total parameters, the teacher
row, and training seeds that reach every random factor."""

from __future__ import annotations

import pytest
import torch

from mlas_lora.experiments.pipeline import initial_student, train_key
from mlas_lora.experiments.systems import resolve_system
from mlas_lora.models.loading import load_model
from mlas_lora.transfer.svd_init import thin_svd
from test_methods import TEXTS, logits, matrix_setting

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return matrix_setting(tmp_path_factory.mktemp("controls"), "float32")


def _base_weights(config) -> dict[str, torch.Tensor]:
    model, _ = load_model(config.models.student, dtype="float32")
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_pissa_trains_the_principal_factors_and_starts_at_the_base_function(tiny):
    config, splits, run = tiny
    pissa, lora = resolve_system("pissa", config), resolve_system("lora", config)
    base = logits(lora, initial_student(lora, splits, run))  # B = 0: the base function
    student = initial_student(pissa, splits, run)
    torch.testing.assert_close(logits(pissa, student), base, rtol=0, atol=1e-4)
    weights, rank = _base_weights(config), 8  # r_gen + r_spe
    layer = student.model.base_model.model.model.layers[0].self_attn.q_proj
    a, b, scaling = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    original = weights["model.layers.0.self_attn.q_proj.weight"]
    u, s, vh = thin_svd(original)
    top = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close(scaling * b @ a, top, rtol=0, atol=1e-5)  # the rank-8 principal part
    torch.testing.assert_close(layer.base_layer.weight, original - top, rtol=0, atol=1e-5)  # the residual
    assert train_key(pissa) != train_key(lora)


def test_mlas_pissa_splits_the_students_own_svd_into_general_and_pair_loras(tiny):
    config, splits, run = tiny
    system = resolve_system("mlas-pissa", config)
    assert not system.method.needs_transfer(system.config)  # no teacher stage runs for the control
    student = initial_student(system, splits, run)
    routed = student.model.routed_layers()
    layer = routed[(0, "q")]
    original = _base_weights(config)["model.layers.0.self_attn.q_proj.weight"]
    u, s, vh = thin_svd(original)
    scale = config.lora.teacher_scale
    general = layer.scaling_gen * layer.general.B @ layer.general.A
    torch.testing.assert_close(general, scale * (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-5)
    for pair in ("en-de", "en-fi"):  # every pair the next 4 components: the student knows no language
        block = layer.specific[pair]
        torch.testing.assert_close(
            layer.scaling_spe * block.B @ block.A, scale * (u[:, 4:8] * s[4:8]) @ vh[4:8], rtol=0, atol=1e-5
        )


def test_lora_total_has_mlas_loras_total_rank(tiny):
    config, splits, run = tiny
    total = initial_student(resolve_system("lora-total", config), splits, run)
    mlas = initial_student(resolve_system("mlas-lora", config), splits, run)
    layer = total.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 4 + 2 * 4  # r_gen + P x r_spe, P = 2 pairs
    count = resolve_system("lora", config).method.trainable_parameters
    assert count(total) == sum(p.numel() for p in mlas.model.parameters() if p.requires_grad)


def test_training_seed_reaches_the_random_factors_of_every_trained_method(tiny):
    config, splits, run = tiny
    for name in ("lora", "M-i"):
        first = initial_student(resolve_system(name, config), splits, run)
        again = initial_student(resolve_system(name, config), splits, run)
        other = initial_student(
            resolve_system({"name": "x", "preset": name, "training": {"seed": 1}}, config), splits, run
        )
        a = [p for p in first.model.parameters() if p.requires_grad]
        assert all(
            torch.equal(x, y)
            for x, y in zip(a, (p for p in again.model.parameters() if p.requires_grad), strict=True)
        )
        assert not all(
            torch.equal(x, y)
            for x, y in zip(a, (p for p in other.model.parameters() if p.requires_grad), strict=True)
        )


def test_the_teacher_row_translates_with_the_teacher(tiny):
    from mlas_lora.experiments.run import hypothesis_keys

    config, _, _ = tiny
    teacher, zero = resolve_system("teacher", config), resolve_system("zero-shot", config)
    assert teacher.method.model(config) == config.models.teacher != zero.method.model(config)
    assert hypothesis_keys(teacher)[1] != hypothesis_keys(zero)[1]


def test_unseen_directions_are_decoded_with_the_general_lora_alone(tiny):
    from mlas_lora.data.records import Example

    config, splits, run = tiny
    system = resolve_system("mlas-lora", config)
    student = initial_student(system, splits, run)  # teacher factors: general and pairs non-zero
    unseen = [Example("en", "et", "open the file", "x"), Example("en", "et", "save it", "y")]
    scope, context = system.method.decode_scope(student, unseen, "none")
    encoded = student.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), scope, context([0, 0]):
        general_alone = student.model(**encoded).logits
    with torch.no_grad(), student.model.routing(["en-de", "en-de"]):
        with_pair = student.model(**encoded).logits
        for layer in student.model.routed_layers().values():
            for block in layer.specific.values():
                block.B.zero_()
        expected = student.model(**encoded).logits
    assert not torch.allclose(with_pair, expected)  # the pair LoRA mattered
    torch.testing.assert_close(general_alone, expected, rtol=0, atol=1e-6)
    assert all(layer.scaling_spe > 0 for layer in student.model.routed_layers().values())  # restored
    mixed = [*unseen, Example("en", "de", "a", "b")]
    with pytest.raises(Exception, match="no LoRA for"):
        system.method.decode_scope(student, mixed, "none")


def test_a_training_key_names_the_trained_directions_not_the_evaluated_ones(tiny):
    from dataclasses import replace

    config, _, _ = tiny
    other = replace(
        config, data=replace(config.data, directions=["en-et"], train_directions=["en-de", "en-fi"])
    )
    assert train_key(resolve_system("lora", other)) == train_key(resolve_system("lora", config))
    assert train_key(resolve_system("mlas-lora", other)) == train_key(resolve_system("mlas-lora", config))
