"""||Delta W|| / ||W|| from r x r Gram matrices equals the norm of the formed update."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.adapters.update_norms import lowrank_norm, peft_update_norms, routed_update_norms
from mlas_lora.testing.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lowrank_norm_equals_the_formed_product():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 5, generator=gen), torch.randn(5, 30, generator=gen)
    assert lowrank_norm(b, a) == pytest.approx(float(torch.linalg.norm((b @ a).double())), rel=1e-9)


def test_routed_norms_per_pair():
    routed = attach_routed_lora(tiny_model("qwen2"), ["en-de", "en-fi"], r_gen=2, r_spe=3)
    norms = routed_update_norms(routed)
    assert norms() == {"en-de": 0.0, "en-fi": 0.0}  # B = 0 at init
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in routed.routed_layers().values():
            layer.specific["en-fi"].B.copy_(torch.randn(layer.specific["en-fi"].B.shape, generator=gen))
    layers = list(routed.routed_layers().values())
    expected = sum(
        float(torch.linalg.norm(layer.merged_weight("en-fi", torch.float64) - layer.base.weight.double()))
        / float(layer.base.weight.double().norm())
        for layer in layers
    ) / len(layers)
    got = norms()
    assert got["en-de"] == 0.0 and got["en-fi"] == pytest.approx(expected, rel=1e-4)


def test_peft_norms():
    model = get_peft_model(
        tiny_model("qwen2"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    norms = peft_update_norms(model)
    assert norms() == {"all": 0.0}
    ratios = []
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_()
                delta = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
                ratios.append(float(delta.norm() / module.get_base_layer().weight.norm()))
    assert norms()["all"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
