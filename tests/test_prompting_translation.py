"""Prompt template, the two prompting baselines, and batched generation."""

import pytest
import torch

from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.languages import Direction, paper_directions, parse_directions
from mlas_lora.prompting import PromptStyle, build_prompt, training_ids
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.translation.baselines import in_context_requests, zero_shot_requests
from mlas_lora.translation.generate import (
    GenerationConfig,
    TranslationRequest,
    clean_output,
    contiguous_head_input,
    translate,
)


def test_directions_parse_and_errors():
    assert Direction.parse("en-de") == Direction("en", "de")
    assert str(Direction.parse("zh-en").reversed()) == "en-zh"
    assert [str(d) for d in paper_directions()][:2] == ["en-cs", "en-de"]
    assert len(paper_directions()) == 14
    with pytest.raises(MlasLoraError, match="unknown language code 'xx': expected an ISO 639"):
        Direction.parse("en-xx")
    with pytest.raises(MlasLoraError, match="SRC-TGT"):
        Direction.parse("ende")
    assert parse_directions("en-de,de-en") == [Direction("en", "de"), Direction("de", "en")]


def test_plain_prompt_is_the_paper_template():
    tok = tiny_tokenizer(chat=False)
    prompt = build_prompt(tok, "en", "de", "Open file")
    assert prompt == "Translate the following text from English to German.\nEnglish: Open file\nGerman:"


def test_chat_prompt_prefills_target_language():
    tok = tiny_tokenizer()
    prompt = build_prompt(tok, "de", "en", "Datei öffnen")
    assert prompt == (
        "<|im_start|>user\nTranslate the following text from German to English.\nGerman: Datei öffnen<|im_end|>\n"
        "<|im_start|>assistant\nEnglish:"
    )
    assert build_prompt(tok, "de", "en", "x", style=PromptStyle(chat=False)).endswith("German: x\nEnglish:")


def test_chat_demonstrations_are_earlier_turns():
    tok = tiny_tokenizer()
    prompt = build_prompt(tok, "en", "de", "Maybe", (Example("en", "de", "Yes", "Ja"),))
    turn = "<|im_start|>user\nTranslate the following text from English to German.\nEnglish: {}<|im_end|>\n"
    assert prompt == (
        turn.format("Yes")
        + "<|im_start|>assistant\nGerman: Ja<|im_end|>\n"
        + turn.format("Maybe")
        + "<|im_start|>assistant\nGerman:"
    )


def test_in_context_prompt_holds_demonstrations_before_source():
    tok = tiny_tokenizer(chat=False)
    demos = (Example("en", "de", "Yes", "Ja"), Example("en", "de", "No", "Nein"))
    prompt = build_prompt(tok, "en", "de", "Maybe", demos)
    assert (
        prompt.index("English: Yes\nGerman: Ja")
        < prompt.index("English: No\nGerman: Nein")
        < prompt.index("English: Maybe\nGerman:")
    )


def test_training_ids_split_prompt_and_target():
    tok = tiny_tokenizer()
    prompt_ids, target_ids = training_ids(tok, Example("en", "de", "Hi", "Hallo"))
    assert tok.decode(target_ids) == " Hallo<|im_end|>"
    assert tok.decode(prompt_ids).endswith("assistant\nGerman:")


def test_in_context_draws_five_seeded_demos_of_the_same_direction():
    train = [Example("en", "de", f"source number {i}", f"quelle {i}") for i in range(20)]
    train += [Example("en", "fi", f"source number {i}", f"lähde {i}") for i in range(20)]
    tests = [
        Example("en", "de", "a test sentence here", "ein test"),
        Example("en", "fi", "another one", "toinen"),
    ]
    first = in_context_requests(tests, train, shots=5, seed=3)
    again = in_context_requests(tests, train, shots=5, seed=3)
    other = in_context_requests(tests, train, shots=5, seed=4)
    assert first == again and first != other
    assert all(len(r.demos) == 5 for r in first)
    assert all(d.direction == r_ex.direction for r, r_ex in zip(first, tests, strict=True) for d in r.demos)
    assert zero_shot_requests(tests)[0].demos == ()


def test_clean_output_keeps_first_line():
    assert clean_output("  Hallo Welt\nEnglish: more") == "Hallo Welt"


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_batched_generation_equals_one_by_one(family):
    """Left padding and length bucketing must not change any greedy output, nor their order."""
    model = tiny_model(family, seed=1, tie_word_embeddings=False)
    with torch.no_grad():  # sharpen attention and logits so greedy outputs differ between inputs
        for name, param in model.named_parameters():
            param.mul_(
                8 if ("q_proj.weight" in name or "k_proj.weight" in name) else 10 if "lm_head" in name else 1
            )
    tok = tiny_tokenizer()
    sources = ["a", "hello there, friend", "xyz 123", "The quick brown fox jumps", "ok"]
    requests = [TranslationRequest("en", "de", s) for s in sources]
    config = GenerationConfig(batch_size=3, max_new_tokens=6)
    batched = translate(model, tok, requests, config, progress=False)
    single = [translate(model, tok, [r], config, progress=False)[0] for r in requests]
    assert batched == single
    assert len(set(single)) > 1, "the test needs inputs whose outputs differ"


def test_batch_context_receives_pairs_of_each_batch():
    model, tok = tiny_model(), tiny_tokenizer()
    seen = []

    class Recorder:
        def __init__(self, pairs):
            seen.append(sorted(pairs))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    requests = [TranslationRequest("en", "de", "aa"), TranslationRequest("en", "fi", "bbbb")]
    translate(
        model,
        tok,
        requests,
        GenerationConfig(batch_size=2, max_new_tokens=2),
        batch_context=Recorder,
        progress=False,
    )
    assert seen == [["en-de", "en-fi"]]


def test_generation_feeds_the_head_contiguous_input_and_removes_its_hook():
    """A frozen head must see a contiguous input at prefill (else matmul copies its weight per row)."""
    model = tiny_model(seed=1, tie_word_embeddings=False).requires_grad_(False)
    tok = tiny_tokenizer()
    head = model.get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    batch = tok(["hello there, friend", "a"], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(**batch, **kwargs)
        assert seen[0] is False, "the test relies on transformers giving the head a strided view at prefill"
        seen.clear()
        with contiguous_head_input(model):
            fixed = model.generate(**batch, **kwargs)
    assert seen and all(seen)
    assert torch.equal(plain, fixed)
    assert not head._forward_pre_hooks, "the pre-hook must be removed on exit"
    seen.clear()
    requests = [TranslationRequest("en", "de", s) for s in ["a", "hello there, friend", "xyz 123"]]
    translate(model, tok, requests, GenerationConfig(batch_size=3, max_new_tokens=2), progress=False)
    assert seen and all(seen), "translate() must use contiguous_head_input"
    assert not head._forward_pre_hooks
