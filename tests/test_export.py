"""Export of the routed student to PEFT adapters / merged models, and routed checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mlas_lora.adapters.export import (
    export_peft_adapters,
    load_routed,
    load_routed_for_inference,
    save_routed,
    serving_rank,
)
from mlas_lora.adapters.routed_lora import attach_routed_lora, init_from_factors
from mlas_lora.errors import MlasLoraError
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate
from test_routed_lora import PAIRS, batch, logits, random_factors

ATOL = 1e-5  # fp32 tiny models: PEFT's x@A@B vs our masked concat differ only by summation order


def trained(family="qwen2", mode="add", **kwargs):
    """A routed model with teacher factors and one AdamW step, so every LoRA and buffer is non-trivial."""
    routed = attach_routed_lora(tiny_model(family), PAIRS, **kwargs)
    init_from_factors(routed, random_factors(routed, std=0.2), mode=mode, teacher_scale=0.7)
    optimizer = torch.optim.AdamW(routed.lora_parameters(), lr=1e-2, weight_decay=0.01)
    inputs = batch()
    with routed.routing([0, 1, 2, 0]):
        routed(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    return routed.eval()


def assert_peft_matches(routed, folders, family="qwen2"):
    inputs = batch()
    peft = PeftModel.from_pretrained(tiny_model(family), str(folders[PAIRS[0]]), adapter_name=PAIRS[0])
    for pair in PAIRS[1:]:
        peft.load_adapter(str(folders[pair]), adapter_name=pair)
    for i, pair in enumerate(PAIRS):
        peft.set_adapter(pair)
        with torch.no_grad():
            theirs = peft(**inputs).logits
        ours = logits(routed, [i] * 4, inputs)
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert (logits(routed, [0] * 4, inputs) - logits(routed, [1] * 4, inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_add_mode_export_matches_peft(tmp_path, family):
    routed = trained(family)
    folders = export_peft_adapters(routed, tmp_path, "tiny/student")
    assert sorted(folders) == sorted(PAIRS)
    config = json.loads((tmp_path / "en-de" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (16, 16, "tiny/student")
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = load_file(str(tmp_path / "en-de" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 16)
    assert_peft_matches(routed, folders, family)


def test_residual_mode_export_matches_peft_on_original_base(tmp_path):
    routed = trained(mode="residual")
    folders = export_peft_adapters(routed, tmp_path, "tiny/student")
    assert json.loads((tmp_path / "en-fi" / "adapter_config.json").read_text())["r"] == 32
    assert_peft_matches(routed, folders)


def test_layer_subset_and_rank_padding(tmp_path):
    routed = trained(r_spe=4, alpha_spe=4, layers=[1], targets=("q", "v", "up"))
    folders = export_peft_adapters(routed, tmp_path, "tiny/student")
    config = json.loads((tmp_path / "en-zh" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (16, 16, [1])
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    a = load_file(str(tmp_path / "en-zh" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    ]
    assert a.shape == (16, 32) and torch.equal(a[12:], torch.zeros(4, 32))  # 8 + 4 padded to 16
    assert_peft_matches(routed, folders)
    with pytest.raises(MlasLoraError, match="not one of vLLM's LoRA ranks"):
        export_peft_adapters(routed, tmp_path / "strict", "tiny/student", pad_rank=False)


def test_serving_rank():
    assert [serving_rank(r) for r in (8, 12, 16, 24, 33, 300, 512)] == [8, 16, 16, 32, 64, 320, 512]
    with pytest.raises(MlasLoraError, match="exceeds vLLM's largest"):
        serving_rank(600)


def test_merged_export_matches_routed(tmp_path):
    routed = trained(mode="residual")
    export_peft_adapters(routed, tmp_path, "tiny/student", merge=True, tokenizer=tiny_tokenizer())
    inputs = batch()
    for i, pair in enumerate(PAIRS):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / pair, attn_implementation="eager")
        assert not any(".base." in n or "general" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            theirs = merged.eval()(**inputs).logits
        torch.testing.assert_close(theirs, logits(routed, [i] * 4, inputs), atol=ATOL, rtol=0)
    assert (tmp_path / "merged" / "en-de" / "tokenizer.json").is_file()


def test_save_load_roundtrip(tmp_path):
    routed = trained(mode="residual", layers=[0], dropout=0.1)
    save_routed(routed, tmp_path)
    manifest = json.loads((tmp_path / "routed_lora.json").read_text())
    assert manifest["residual"] is True and manifest["config"]["init"] == "residual"
    assert manifest["config"]["pairs"] == list(PAIRS) and manifest["tensors"] == 7 * 4 * 4
    loaded = load_routed(tiny_model(), tmp_path)
    inputs = batch()
    assert torch.equal(logits(loaded, [2, 1, 0, 1], inputs), logits(routed, [2, 1, 0, 1], inputs))
    assert loaded.lora_config == routed.lora_config
    served, context = load_routed_for_inference(tiny_model(), tmp_path)
    assert not served.training and served.config.vocab_size == 260  # HF config passes through
    with context(["en-zh", "en-fi", "en-de", "en-fi"]):
        assert torch.equal(served(**inputs).logits.detach(), logits(routed, [2, 1, 0, 1], inputs))
    with pytest.raises(MlasLoraError, match="does not match"):
        load_routed(attach_routed_lora(tiny_model(), PAIRS, r_gen=16), tmp_path)
    with pytest.raises(MlasLoraError, match="no routed LoRA manifest"):
        load_routed(tiny_model(), tmp_path / "nowhere")


def test_translate_mixed_directions_through_batch_context(tmp_path):
    """translation.translate with batch_context=routing equals translating each direction alone."""
    save_routed(trained(), tmp_path)
    routed, context = load_routed_for_inference(tiny_model(), tmp_path)
    tok, config = tiny_tokenizer(), GenerationConfig(batch_size=4, max_new_tokens=4)
    sources = ["hello", "good morning", "cat", "one two"]
    requests = [
        TranslationRequest("en", tgt, s) for tgt, s in zip(["de", "fi", "zh", "fi"], sources, strict=True)
    ]
    mixed = translate(routed, tok, requests, config, batch_context=context, progress=False)
    alone = [translate(routed, tok, [r], config, batch_context=context, progress=False)[0] for r in requests]
    assert mixed == alone
    other = [TranslationRequest("en", "de", s) for s in sources]
    assert translate(routed, tok, other, config, batch_context=context, progress=False) != mixed


def test_a_damaged_adapter_folder_is_named(tmp_path):
    save_routed(trained(), tmp_path)
    weights, manifest = tmp_path / "routed_lora.safetensors", tmp_path / "routed_lora.json"
    good, text = weights.read_bytes(), manifest.read_text()
    for blob in (good[: len(good) // 2], b""):
        weights.write_bytes(blob)
        with pytest.raises(MlasLoraError) as err:
            load_routed(tiny_model(), tmp_path)
        assert str(err.value).startswith(f"{weights}: truncated or corrupt safetensors file")
        assert "save or export the adapters again" in str(err.value)
    weights.write_bytes(good)
    for garbled, what in (
        (text[: len(text) // 2], "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "mlas-lora-routed/1"}', "missing 'config'"),
        (text.replace('"r_gen"', '"r_general"'), "bad config"),
    ):
        manifest.write_text(garbled)
        with pytest.raises(MlasLoraError) as err:
            load_routed(tiny_model(), tmp_path)
        assert str(err.value).startswith(f"{manifest}: ") and what in str(err.value), str(err.value)
        assert "save or export the adapters again" in str(err.value)


def test_adapters_record_their_base_model_and_refuse_another(tmp_path, capsys):
    from mlas_lora.cli import main
    from mlas_lora.models.loading import load_model
    from mlas_lora.testing.tiny import save_tiny

    a, b = save_tiny(tmp_path / "a", seed=1), save_tiny(tmp_path / "b", seed=2)
    save_routed(attach_routed_lora(load_model(a, dtype="float32")[0], PAIRS), tmp_path / "adapters")
    manifest = json.loads((tmp_path / "adapters" / "routed_lora.json").read_text())
    assert manifest["base_model"] == str(a.resolve())
    load_routed(load_model(a, dtype="float32")[0], tmp_path / "adapters")
    with pytest.raises(MlasLoraError) as err:
        load_routed(load_model(b, dtype="float32")[0], tmp_path / "adapters")
    assert f"trained on {a.resolve()}, not on {b.resolve()}" in str(err.value)
    assert "check_base=False" in str(err.value) and "--any-base" in str(err.value)
    load_routed(load_model(b, dtype="float32")[0], tmp_path / "adapters", check_base=False)
    args = [
        "translate",
        "--model",
        str(b),
        "--pair",
        "en-de",
        "--text",
        "x",
        "--adapters",
        str(tmp_path / "adapters"),
    ]
    assert main(args) == 2 and "--any-base" in capsys.readouterr().err
    assert main([*args, "--any-base"]) == 0


def test_an_embedded_students_adapters_name_its_hub_id(tmp_path, monkeypatch):
    from mlas_lora.config import config_from_dict
    from mlas_lora.experiments.config import ExperimentConfig
    from mlas_lora.methods.base import Student
    from mlas_lora.methods.mlas import MlasLora
    from mlas_lora.methods.peft_lora import PeftLora, peft_config
    from mlas_lora.models.loading import base_model_id
    from mlas_lora.models.registry import prepared_dir

    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    student, hub = "qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    config = config_from_dict(ExperimentConfig, {"models": {"student": student}})
    MlasLora().export(Student(trained(), tiny_tokenizer()), config, tmp_path / "out")
    assert (
        json.loads((tmp_path / "out" / "en-de" / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        == hub
    )
    peft = get_peft_model(tiny_model(), peft_config(config.lora))
    PeftLora().export(Student(peft, tiny_tokenizer()), config, tmp_path / "lora")
    assert (
        json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == hub
    )
    prepared_dir(student).mkdir(parents=True)
    assert base_model_id(prepared_dir(student)) == base_model_id(student) == hub
    assert base_model_id("org/model") == "org/model" and base_model_id("") == ""
