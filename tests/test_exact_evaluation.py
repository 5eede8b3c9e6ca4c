"""Evaluation runs the function that was trained: no bfloat16 merge rounds a small update away."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.data.records import Example
from mlas_lora.methods import Student, get_method
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

PAIRS = ("en-de", "en-fi")
TEXTS = ["Hello world, how are you?", "Guten Tag", "The cat sat on the mat today."]
EXAMPLES = [Example("en", "de", t, t) for t in TEXTS]
MEAN_TOLERANCE, MAX_TOLERANCE = 5e-3, 5e-2
"""Allowed mean and largest |logit| difference between two bf16 computations of the same function
(evaluation: LoRA in float32 added to bf16 outputs; training: LoRA in bf16 under autocast; float32
merge): the tiny model's logits are ~0.1 in size, so this is bf16 rounding carried through 2 layers."""


def assert_same_function(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = (a - b).abs()
    assert diff.mean() < MEAN_TOLERANCE and diff.max() < MAX_TOLERANCE, (diff.mean(), diff.max())


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs():
    return tiny_tokenizer()(TEXTS, return_tensors="pt", padding=True)


def routed_student(b=0.05):
    """A bf16 routed tiny student with a non-zero, smallish update on every layer."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    routed = attach_routed_lora(model, PAIRS, r_gen=4, r_spe=4).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in routed.routed_layers().values():
            for block in (layer.general, *layer.specific.values()):
                block.A.copy_(torch.randn(block.A.shape, generator=gen) * 0.1)
                block.B.fill_(b)
    return routed


def small_update_layer():
    """One routed layer whose update is below half a bf16 step of every base weight, but not of its output.

    Base weights are +-0.05 (half a bf16 step: 1.2e-4); the update s (B A) is 1e-4 * u with u a unit
    vector along the input x (largest element < 0.4), so every weight rounds back to itself in a bf16
    merge, while the output moves by 1e-4 |x| = 8e-4 against half a step of 4.9e-4 at |y| ~ 0.4.
    """
    routed = attach_routed_lora(tiny_model("qwen2").to(torch.bfloat16), PAIRS, r_gen=4, r_spe=4).eval()
    layer = routed.routed_layers()[(0, "q")]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, layer.in_features, generator=gen).to(torch.bfloat16)
    u = x.float().flatten() / x.float().norm()
    with torch.no_grad():
        signs = torch.randint(0, 2, layer.base.weight.shape, generator=gen) * 2 - 1
        layer.base.weight.copy_(signs * 0.05)
        for block, scaling in (
            (layer.general, layer.scaling_gen),
            *((b, layer.scaling_spe) for b in layer.specific.values()),
        ):
            block.A.zero_()
            block.A[0] = u
            block.B.zero_()
            block.B[:, 0] = 0.5e-4 / scaling  # general + specific: 1e-4 in all
    return routed, layer, x


def _pair_scope(routed, examples, merge: str):
    """How the mlas-lora method decodes a one-pair test set (its `decode_scope`)."""
    return get_method("mlas-lora").decode_scope(Student(routed, None), examples, merge)


def evaluation_logits(routed, merge: str) -> torch.Tensor:
    """Logits as the experiment's translator computes them for a one-pair test set."""
    scope, context = _pair_scope(routed, EXAMPLES, merge)
    with torch.no_grad(), scope:
        if context is None:
            return routed(**inputs()).logits.float()
        with context(["en-de"] * len(TEXTS)):
            return routed(**inputs()).logits.float()


def test_bf16_merge_loses_a_small_update_that_the_unmerged_layer_keeps():
    routed, layer, x = small_update_layer()
    with torch.no_grad():
        base = F.linear(x, layer.base.weight)
        reference = x.float() @ layer.merged_weight("en-de", torch.float32).T
        with routed.routing(["en-de"]):
            exact = layer(x)
        with routed.merged("en-de"):
            merged = layer(x)
    assert torch.equal(layer.merged_weight("en-de"), layer.base.weight)  # every weight rounds back
    assert torch.equal(merged, base)  # so the bf16-merged layer is the base layer
    assert not torch.equal(exact, base)
    assert (exact.float() - reference).abs().mean() < (merged.float() - reference).abs().mean()


def test_default_evaluation_scope_runs_the_adapters_unmerged():
    routed = routed_student()
    scope, context = _pair_scope(routed, EXAMPLES, "none")
    assert context is not None  # routed per batch, nothing merged
    with scope:
        assert all(layer.merged_pair is None for layer in routed.routed_layers().values())
    scope, context = _pair_scope(routed, EXAMPLES, "weights")
    with scope:
        assert context is None and all(
            layer.merged_pair == "en-de" for layer in routed.routed_layers().values()
        )
    with torch.no_grad(), routed.merged("en-de", dtype=torch.float32):
        wide = routed(**inputs()).logits.float()  # W + B A kept in float32
    assert_same_function(evaluation_logits(routed, "none"), wide)


def test_default_evaluation_equals_the_training_path():
    routed = routed_student()
    exact = evaluation_logits(routed, "none")
    with torch.no_grad(), routed.routing(["en-de"] * len(TEXTS)), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = routed(**inputs()).logits.float()
    assert_same_function(exact, trained)


def test_float32_merge_restores_the_weights_bitwise():
    routed = routed_student()
    before = {k: v.clone() for k, v in routed.model.state_dict().items()}
    with routed.merged("en-fi", dtype=torch.float32):
        layer = next(iter(routed.routed_layers().values()))
        assert layer.merged_copy is not None and layer.merged_copy.dtype == torch.float32
    after = routed.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        layer.merged_copy is None and layer.merged_pair is None for layer in routed.routed_layers().values()
    )
