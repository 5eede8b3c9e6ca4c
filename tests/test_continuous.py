"""Continuous batching (`translation/continuous.py`): each row decodes as it would alone, the shared
prompt prefix gives the full prefill's logits, and a routed row keeps its pair whatever its neighbours.

Float32 tiny models (rows ending at varied steps, from `test_generation_speed.sharpened`), so that
any difference is a bug, not bf16 rounding: the greedy tokens must be equal, logits within 1e-5.
"""

import itertools

import pytest
import torch

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.testing.tiny import tiny_tokenizer
from mlas_lora.translation.continuous import ContinuousDecoder, Row
from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate
from test_generation_speed import PAIRS, SOURCES, requests_of, sharpened

pytestmark = pytest.mark.usefixtures("one_thread")

MANY = [f"{s} {i}" for i in range(3) for s in SOURCES]  # 30 sources: several refills


def model_of(family: str):
    """A sharpened float32 model; Gemma 2's sliding window widened past the prompts, so that the
    continuous decoder applies (a window shorter than a prompt falls back to the bucketed loop)."""
    model = sharpened(family)
    if family == "gemma2":
        model.config.sliding_window = 4096
    return model


def alone(model, requests, config, context=None) -> list[str]:
    return [translate(model, tiny_tokenizer(), [r], config, context, progress=False)[0] for r in requests]


def head_batches(model) -> list[int]:
    rows: list[int] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    return rows


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_each_row_gets_the_tokens_it_gets_alone(family, prefix_cache):
    model = model_of(family)
    requests = [TranslationRequest("en", "de", s) for s in MANY]
    config = GenerationConfig(batch_size=6, max_new_tokens=16, prefix_cache=prefix_cache)
    batches = head_batches(model)
    together = translate(model, tiny_tokenizer(), requests, config, progress=False)
    assert max(batches) <= 6
    refills = sum(1 for a, b in itertools.pairwise(batches) if b > a)
    assert refills >= 3, "rows must join a batch that is already decoding"
    assert together == alone(model, requests, config)
    assert len(set(together)) > 10, "the test needs outputs that differ between inputs"


def calls_of(model) -> list[tuple[int, int]]:
    """(rows, tokens per row) of every model call, recorded into the returned list."""
    calls: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return calls


def test_the_batch_stays_full_until_the_prompts_run_out():
    """Every prompt is prefilled once; until the last prefill, every decode step carries more than
    batch_size - refill rows (a prefill comes as soon as `refill` slots are free)."""
    model = model_of("qwen2")
    requests = [TranslationRequest("en", "de", s) for s in MANY]
    calls = calls_of(model)
    config = GenerationConfig(batch_size=8, max_new_tokens=16, prefix_cache=False)
    translate(model, tiny_tokenizer(), requests, config, progress=False)
    prefills = [i for i, (_, width) in enumerate(calls) if width > 1]
    assert sum(calls[i][0] for i in prefills) == len(requests)
    before_last = [rows for rows, width in calls[: prefills[-1]] if width == 1]
    assert before_last and min(before_last) > 8 - 2, "refill 2 (batch_size // 4)"
    assert len(prefills) >= 4


def test_the_shared_prefix_gives_the_full_prefills_logits():
    """The first-token logits of every row, with the prefix run once per pair and copied, equal those of
    the full prompt's prefill (float32, 1e-5), and fewer prompt tokens go through the model."""
    model = model_of("llama")
    requests = requests_of(("en-de", "en-fi"))
    seen: list[torch.Tensor] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out[:, -1].detach()))
    tokens: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: tokens.append(kw["input_ids"].numel()), with_kwargs=True
    )

    def first_logits(prefix_cache: bool) -> tuple[torch.Tensor, int]:
        seen.clear()
        tokens.clear()
        config = GenerationConfig(batch_size=10, max_new_tokens=1, prefix_cache=prefix_cache)
        translate(model, tiny_tokenizer(), requests, config, progress=False)
        prefill = seen[-1]  # one prefill of all 10 rows, after the prefix passes
        return prefill, sum(tokens)

    cached, cached_tokens = first_logits(True)
    full, full_tokens = first_logits(False)
    assert cached.shape == full.shape == (10, 260)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert cached_tokens < full_tokens * 0.6, "the prefix must be run once per pair, not per row"


def routed(seed: int = 0):
    """Float32 routed student whose pairs' LoRAs change the outputs (large random B)."""
    model = attach_routed_lora(sharpened(), PAIRS, r_gen=2, r_spe=4).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            for block in (layer.general, *layer.specific.values()):
                block.B.copy_(torch.randn(block.B.shape, generator=generator) * 2)
    return model


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_routed_row_keeps_its_pair_when_its_neighbours_change(prefix_cache):
    """Rows of three pairs share every forward, join and leave at different steps: each row's tokens are
    those of its own pair decoded alone; routed to another pair they differ (routing matters)."""
    model = routed()
    requests = [TranslationRequest(*PAIRS[i % 3].split("-"), s) for i, s in enumerate(MANY)]
    config = GenerationConfig(batch_size=5, max_new_tokens=16, prefix_cache=prefix_cache)
    seen: list[list[str]] = []

    def context(pairs):
        seen.append(list(pairs))
        return model.routing(pairs)

    together = translate(model, tiny_tokenizer(), requests, config, context, progress=False)
    assert together == alone(model, requests, config, model.routing)
    assert any(len(set(p)) == 3 for p in seen), "forwards must mix the three pairs"
    wrong = [TranslationRequest("en", "de", r.source) for r in requests]
    assert together != translate(model, tiny_tokenizer(), wrong, config, model.routing, progress=False)
    assert model.router.present == (), "the routing is restored after translating"


def test_rows_stop_at_their_own_budget():
    """With no stop token, each row generates exactly its own budget, whatever its neighbours'."""
    model = model_of("qwen2")
    prompts = [[5 + i, 40 + i, 7, 9 + i][: 2 + i % 3] for i in range(9)]
    rows = [Row(i, "en-de", p, budget=1 + (3 * i) % 7) for i, p in enumerate(prompts)]
    decoder = ContinuousDecoder(
        model, torch.zeros(260, dtype=torch.bool), 0, batch_size=4, prefix_cache=False
    )
    out = decoder.decode(rows)
    assert [len(out[r.index]) for r in rows] == [r.budget for r in rows]


def test_a_row_budget_follows_its_own_source():
    from mlas_lora.translation.generate import _row_budget

    tok = tiny_tokenizer()
    config = GenerationConfig(length_ratio=0.5, length_margin=2, max_new_tokens=10)
    short, long = TranslationRequest("en", "de", "abcd"), TranslationRequest("en", "de", "x" * 40)
    assert _row_budget(tok, short, config) == 4  # 4 byte tokens x 0.5 + 2
    assert _row_budget(tok, long, config) == 10  # capped at max_new_tokens


def test_the_default_decoder_is_continuous_and_beams_still_use_generate():
    model = model_of("qwen2")
    requests = requests_of()[:4]
    calls: list[int] = []
    original = ContinuousDecoder.decode

    def counting(self, rows, progress=None):
        calls.append(len(rows))
        return original(self, rows, progress)

    ContinuousDecoder.decode = counting
    try:
        translate(model, tiny_tokenizer(), requests, GenerationConfig(max_new_tokens=4), progress=False)
        assert calls == [4]
        translate(
            model, tiny_tokenizer(), requests, GenerationConfig(max_new_tokens=4, num_beams=2), progress=False
        )
        assert calls == [4]
    finally:
        ContinuousDecoder.decode = original


def test_a_window_shorter_than_a_prompt_falls_back_to_the_bucketed_loop():
    """Gemma 2's tiny window (64) is shorter than the prompts: the bucketed loop decodes (prefix off),
    and its outputs are those of generate."""
    model = sharpened("gemma2")
    requests = requests_of()
    config = GenerationConfig(batch_size=4, max_new_tokens=16)
    calls: list[int] = []
    original = ContinuousDecoder.decode
    ContinuousDecoder.decode = lambda self, rows, progress=None: (
        calls.append(1) or original(self, rows, progress)
    )
    try:
        out = translate(model, tiny_tokenizer(), requests, config, progress=False)
    finally:
        ContinuousDecoder.decode = original
    assert calls == []
    assert out == translate(model, tiny_tokenizer(), requests, config, progress=False, decoder="generate")


def test_a_prefill_leaves_every_row_right_aligned_with_zeros_in_its_padding():
    """After a prefill with a cached prefix and suffixes of several lengths, each row's cache columns are
    contiguous at the right (the pads that sat between prefix and suffix move to its left, zeroed), the
    layout `generate` decodes from, and the cache is no wider than the longest row."""
    model = model_of("llama")
    prompts = [[5, 6, 7, 8, 9, 10] + [20 + i] * (1 + i) for i in range(4)]
    rows = [Row(i, "en-de", p, budget=3) for i, p in enumerate(prompts)]
    decoder = ContinuousDecoder(model, torch.zeros(260, dtype=torch.bool), 0, batch_size=4)
    decoder._compute_prefixes(rows)
    assert decoder.prefixes["en-de"].length == 6
    with torch.inference_mode():
        batch, _ = decoder._prefill(rows)
    lengths = [len(p) for p in prompts]
    width = batch.attention.shape[1]
    assert width == max(lengths) == batch.cache.get_seq_length()
    for row, length in enumerate(lengths):
        assert batch.attention[row].tolist() == [0] * (width - length) + [1] * length
        keys = batch.cache.layers[0].keys[row]
        assert torch.count_nonzero(keys[:, : width - length]) == 0
        assert torch.count_nonzero(keys[:, width - length :]) > 0
