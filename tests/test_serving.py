"""`mlas-lora export --check`: exported adapters against vLLM's LoRA rules and PEFT loading."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from mlas_lora.adapters.export import export_peft_adapters
from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.adapters.serving import adapter_folders, adapter_problems, vllm_command
from mlas_lora.testing.tiny import tiny_model


def exported(tmp_path):
    routed = attach_routed_lora(tiny_model(), ["en-de", "en-fi"], r_gen=4, r_spe=4)
    export_peft_adapters(routed, tmp_path / "out", "tiny/student")
    return tmp_path / "out"


def test_our_export_is_servable_and_the_command_names_every_adapter(tmp_path):
    folders = adapter_folders(exported(tmp_path))
    assert sorted(folders) == ["en-de", "en-fi"]
    assert all(adapter_problems(path) == [] for path in folders.values())
    command = vllm_command("Qwen/Qwen2.5-Coder-0.5B-Instruct", folders)
    assert command.startswith("vllm serve Qwen/Qwen2.5-Coder-0.5B-Instruct --enable-lora --max-loras 2")
    assert "--max-lora-rank 8" in command and f"en-de={folders['en-de']}" in command


def test_what_vllm_refuses_is_named(tmp_path):
    folder = adapter_folders(exported(tmp_path))["en-de"]
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(
        r=12, bias="all", use_dora=True, modules_to_save=["lm_head"], target_modules=["q_proj", "mlp"]
    )
    (folder / "adapter_config.json").write_text(json.dumps(config))
    problems = "\n".join(adapter_problems(folder))
    for expected in (
        "rank 12 is not one of vLLM's ranks",
        "bias 'all'",
        "DoRA",
        "modules_to_save",
        "['mlp']",
    ):
        assert expected in problems, expected
    assert "has rank 8, the config says 12" in problems  # the tensors no longer match the config
    save_file({"base_model.model.x.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    assert "is not a LoRA factor" in "\n".join(adapter_problems(folder))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert "unreadable safetensors" in "\n".join(adapter_problems(folder))
    assert "not a PEFT adapter folder" in adapter_problems(tmp_path)[0]
