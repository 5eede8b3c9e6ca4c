"""MELoRA (methods/melora.py): a block-diagonal update of n mini-LoRAs, computed without the dense
matrix, that starts at the base model, has MLAS-LoRA's parameter count by default, and exports as
a PEFT LoRA of rank n r giving the same logits."""

import json

import pytest
import torch
from peft import PeftModel
from torch import nn

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.adapters.wrapped import adapter_layers, export_peft
from mlas_lora.config import config_from_dict
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods import METHODS
from mlas_lora.methods.base import count_trainable
from mlas_lora.methods.melora import MELoRALinear, MELoRAShape, attach_melora, melora_shape
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.testing.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 60, 7, 100, 9, 33], [1, 2, 3, 200, 201, 202]])


def config(**sections):
    return config_from_dict(ExperimentConfig, {"lora": {"r_gen": 4, "r_spe": 4}, **sections})


def test_starts_at_the_base_model_bitwise():
    base, student = tiny_model(), tiny_model()
    attach_melora(student, MELoRAShape(n=8, r=2, scaling=2.0, dropout=0.0, targets=PROJECTIONS))
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, base(IDS).logits)


def test_update_is_exactly_block_diagonal_after_a_training_step():
    torch.manual_seed(0)
    n, d_in, d_out = 4, 12, 8
    layer = MELoRALinear(nn.Linear(d_in, d_out), n=n, r=2, scaling=0.5)
    layer.base.requires_grad_(False)
    optimizer = torch.optim.AdamW([layer.A, layer.B], lr=0.1)
    x = torch.randn(3, 5, d_in)
    (layer(x) - torch.randn(3, 5, d_out)).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        eye = torch.eye(d_in)
        dense = (layer(eye) - layer.base(eye)).T  # column j is Delta W e_j: the whole update [out, in]
        for i in range(n):
            for j in range(n):
                block = dense[i * 2 : (i + 1) * 2, j * 3 : (j + 1) * 3]
                if i != j:
                    assert torch.equal(block, torch.zeros_like(block)), (i, j)
                else:
                    torch.testing.assert_close(block, 0.5 * layer.B[i] @ layer.A[i], rtol=0, atol=1e-6)
                    assert block.abs().min() > 0  # B_i moved off zero
        b, a = layer.lowrank_update()
        assert b.shape == (d_out, n * 2) and a.shape == (n * 2, d_in)
        torch.testing.assert_close(b @ a, dense, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dense.T, rtol=0, atol=1e-5)


def test_parameter_count_is_n_r_times_the_slices_and_matches_mlas_lora_by_default():
    n, r = 8, 3
    model = tiny_model()
    attach_melora(model, MELoRAShape(n, r, 2.0, 0.0, PROJECTIONS))
    for layer in adapter_layers(model).values():
        per = n * r * (layer.in_features // n + layer.out_features // n)
        assert layer.A.numel() + layer.B.numel() == per
    # 2 layers x (q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32) = 1024 per rank
    assert count_trainable(model) == 1024 * r
    shape = melora_shape(config(), 2)
    assert (shape.n, shape.r, shape.scaling) == (8, 4 + 2 * 4, 16.0 / 4)
    ours, mlas = tiny_model(), tiny_model()
    attach_melora(ours, shape)
    assert count_trainable(ours) == count_trainable(
        attach_routed_lora(mlas, ["en-de", "en-fi"], r_gen=4, r_spe=4)
    )
    assert count_trainable(ours) == 1024 * 12


def test_options_set_the_paper_sizes_and_bad_ones_are_problems():
    shape = melora_shape(config(options={"n": 4, "r": 1, "alpha": 16}), 2)
    assert (shape.n, shape.r, shape.scaling) == (4, 1, 16.0)
    method = METHODS["melora"]
    assert method.problems(config(options={"n": 4})) == []
    (problem,) = method.problems(config(options={"n": 0, "rank": 2}))
    assert "options.n must be >= 1" in problem and "rank: unknown key" in problem  # one error, all problems


def test_a_projection_not_divisible_by_n_is_one_clear_error():
    with pytest.raises(MlasLoraError) as err:
        attach_melora(tiny_model(), MELoRAShape(5, 1, 1.0, 0.0, ("q", "k", "gate")))
    assert "options.n = 5" in str(err.value)
    assert (
        "q (32x32)" in str(err.value) and "k (16x32)" in str(err.value) and "gate (64x32)" in str(err.value)
    )


def test_export_is_a_peft_lora_of_rank_n_r_with_the_same_logits(tmp_path):
    torch.manual_seed(1)
    model = tiny_model()
    attach_melora(model, MELoRAShape(8, 2, 2.0, 0.0, PROJECTIONS))
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.B.normal_(0, 0.1)
        ours = model(IDS).logits
    folder = export_peft(model, tmp_path / "melora", "tiny")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 16
    peft = PeftModel.from_pretrained(tiny_model(), str(folder)).eval()
    with torch.no_grad():
        theirs = peft(IDS).logits
    assert not torch.allclose(theirs, tiny_model()(IDS).logits)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_the_melora_preset_is_the_official_llm_setting_and_melora_matched_the_budget():
    from mlas_lora.experiments.systems import resolve_system
    from mlas_lora.models.arch import ArchInfo

    official = resolve_system("melora", config())
    shape = melora_shape(official.config, 2)
    assert (shape.n, shape.r, shape.scaling, shape.dropout, shape.targets) == (8, 1, 16.0, 0.05, ("q", "v"))
    assert official.method.training_config(official.config).lr == 3e-4  # llama_finetune.sh:8
    model = tiny_model()
    attach_melora(model, shape)
    assert count_trainable(model) == 2 * 1 * ((32 + 32) + (32 + 16)) == 224  # layers x r (d_in + d_out)
    # Qwen2.5-0.5B: n r (d_in / n + d_out / n) = r (d_in + d_out) on q and v, for any number of pairs
    qwen = ArchInfo("qwen2", 24, 896, 4864, 14, 2, 64)
    assert 24 * sum(sum(qwen.projection_shape(p)) for p in shape.targets) == 24 * (1792 + 1024) == 67_584
    matched = resolve_system("melora-matched", config())
    assert melora_shape(matched.config, 2) == MELoRAShape(8, 12, 4.0, 0.0, PROJECTIONS)
    assert matched.method.training_config(matched.config) is matched.config.training  # training.lr
    assert matched.method.train_key(matched.config, {}) == METHODS["melora"].train_key(config(), {})
