"""Houlsby bottleneck adapters (adapters/bottleneck.py, methods/houlsby.py): placed after o_proj and
down_proj before the residual add (before Gemma 2's post-norms), the base model bitwise at W_up = 0,
the formula by hand, only the adapters train, and the saved files reload to the same logits."""

import json

import pytest
import torch

from mlas_lora.adapters.bottleneck import (
    AdaptedProjection,
    BottleneckAdapter,
    BottleneckConfig,
    adapters,
    attach_bottleneck,
    load_bottleneck,
    matching_bottleneck,
    parameters_per_layer,
    read_bottleneck_config,
    save_bottleneck,
)
from mlas_lora.config import config_from_dict
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods import METHODS
from mlas_lora.methods.base import count_trainable
from mlas_lora.models.arch import decoder_layers
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["qwen2", "llama", "gemma2"]
IDS = torch.tensor([[5, 60, 7, 100, 9, 33], [1, 2, 3, 200, 201, 202]])
PAIRS = ["en-de", "en-fi"]
EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)] + [
    Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(8)
]


def adapted(family: str, bottleneck: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    return attach_bottleneck(tiny_model(family), BottleneckConfig(bottleneck))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_is_the_base_bitwise_at_w_up_zero(family):
    base, student = tiny_model(family), adapted(family)
    with torch.no_grad():
        assert not torch.equal(student(IDS).logits, base(IDS).logits)  # Houlsby's init: near identity
        for adapter in adapters(student).values():
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()
        assert torch.equal(student(IDS).logits, base(IDS).logits)


def test_adapter_is_h_plus_w_up_gelu_w_down_h_plus_b1_plus_b2():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(8, BottleneckConfig(3, init_scale=0.5))
    with torch.no_grad():
        adapter.down.bias.normal_()
        adapter.up.bias.normal_()
        h = torch.randn(2, 5, 8)
        w_down, b1, w_up, b2 = adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias
        inner = h @ w_down.T + b1
        gelu = 0.5 * inner * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (inner + 0.044715 * inner**3)))
        torch.testing.assert_close(adapter(h), h + gelu @ w_up.T + b2, rtol=0, atol=1e-6)


def test_init_is_a_truncated_normal_of_std_init_scale_with_zero_biases():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(256, BottleneckConfig(64))
    for linear in (adapter.down, adapter.up):
        assert linear.weight.abs().max() <= 2e-3 and torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert 0.75e-3 < linear.weight.std() < 0.95e-3  # a normal of std 1e-3 cut at 2 std: 0.88e-3


def _capture(modules: dict) -> tuple[dict, list]:
    seen, handles = {}, []
    for name, module in modules.items():
        handles.append(
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args, out)))
        )
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_read_the_projection_output_and_feed_the_residual_add(family):
    """o_proj / down_proj -> adapter -> (Gemma 2: post-norm) -> residual add, in every layer."""
    student = adapted(family)
    for layer in decoder_layers(student):
        o, down = layer.self_attn.o_proj, layer.mlp.down_proj
        assert isinstance(o, AdaptedProjection) and isinstance(down, AdaptedProjection)
        watched = {
            "layer": layer,
            "o": o,
            "o.base": o.base,
            "o.adapter": o.adapter,
            "down": down,
            "down.base": down.base,
            "down.adapter": down.adapter,
            "post_attn": layer.post_attention_layernorm,
        }
        if family == "gemma2":
            watched["post_ff"] = layer.post_feedforward_layernorm
        seen, handles = _capture(watched)
        with torch.no_grad():
            student(IDS)
        for handle in handles:
            handle.remove()
        assert torch.equal(seen["o.adapter"][0][0], seen["o.base"][1])  # the adapters read the projections
        assert torch.equal(seen["down.adapter"][0][0], seen["down.base"][1])
        layer_in, layer_out = seen["layer"][0][0], seen["layer"][1]
        layer_out = layer_out[0] if isinstance(layer_out, tuple) else layer_out
        if family == "gemma2":  # Gemma 2: adapter -> post_attention_layernorm / post_feedforward_layernorm
            assert torch.equal(seen["post_attn"][0][0], seen["o"][1])
            assert torch.equal(seen["post_ff"][0][0], seen["down"][1])
            mid = layer_in + seen["post_attn"][1]
            assert torch.equal(layer_out, mid + seen["post_ff"][1])
        else:  # pre-norm: the adapter's output is what the residual adds
            mid = layer_in + seen["o"][1]
            assert torch.equal(seen["post_attn"][0][0], mid)
            assert torch.equal(layer_out, mid + seen["down"][1])


def test_training_moves_only_the_adapters(tmp_path):
    student = adapted("qwen2", bottleneck=5)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    assert set(trained) == {
        f"{n}.{k}"
        for n in _adapter_paths(student)
        for k in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    assert count_trainable(student) == 2 * parameters_per_layer(32, 5) == 2 * 2 * (2 * 32 * 5 + 5 + 32)
    config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=1, max_steps=2, checkpoint_every=1)
    save = lambda path: save_bottleneck(student, path)  # noqa: E731
    Trainer(
        student,
        tiny_tokenizer(),
        EXAMPLES,
        PAIRS,
        config,
        tmp_path,
        None,
        save,
        lambda path: load_bottleneck(student, path),
    ).fit(progress=False)
    params = dict(student.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.allclose(params[n], p) for n, p in trained.items())


def _adapter_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def test_saved_files_reload_into_a_fresh_base_with_the_same_logits(tmp_path):
    student = adapted("llama", bottleneck=4)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        expected = student(IDS).logits
    save_bottleneck(student, tmp_path, base_model="tiny")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bottleneck.json", "bottleneck.safetensors"]
    manifest = json.loads((tmp_path / "bottleneck.json").read_text())
    assert manifest["placements"] == ["o", "down"] and manifest["bottleneck"] == 4
    fresh = attach_bottleneck(tiny_model("llama"), read_bottleneck_config(tmp_path))
    load_bottleneck(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, expected)
    with pytest.raises(MlasLoraError, match="bottleneck size"):
        load_bottleneck(adapted("llama", bottleneck=5), tmp_path)


def test_adapters_stay_float32_on_a_bf16_base():
    student = attach_bottleneck(tiny_model().bfloat16(), BottleneckConfig(4))
    adapter = next(iter(adapters(student).values()))
    assert adapter.up.weight.dtype == torch.float32
    with torch.no_grad():
        assert student(IDS).logits.dtype == torch.bfloat16


def _config(**options):
    return config_from_dict(ExperimentConfig, {"lora": {"r_gen": 4, "r_spe": 4}, "options": options})


def test_default_bottleneck_matches_mlas_lora_and_options_are_checked():
    # tiny student: MLAS-LoRA (r 4 + 2 pairs x 4) trains 2 layers x 512 x 12 = 12,288; m = 47 gives 12,348
    assert matching_bottleneck(32, 2, 12288) == 47 and 2 * parameters_per_layer(32, 47) == 12348
    # Qwen2.5-0.5B (d 896, 24 layers), 4 pairs at r 8 + 4 x 8: 21,995,520 -> m = 255
    assert matching_bottleneck(896, 24, 21_995_520) == 255
    assert 24 * parameters_per_layer(896, 255) == 21_989_328
    method = METHODS["adapter"]
    assert method.problems(_config()) == []
    assert len(method.problems(_config(bottleneck=0, init_scale=-1.0))) == 2
    key = method.train_key(_config(), {})
    assert key["budget"]["r_spe"] == 4 and "budget" not in method.train_key(_config(bottleneck=8), {})
