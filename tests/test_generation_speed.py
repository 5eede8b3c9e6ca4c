"""The bucketed greedy loop (`translate(decoder="loop" / "shrink")`, the default before continuous
batching and the fallback for a sliding window shorter than a prompt) against Hugging Face `generate`.

Every model gets a head hook that makes rows end at different steps, by "\\n" or by end-of-sequence,
chosen per row from its own hidden state, so finished rows really leave the batch; each test
checks that they did (fewer rows reach the head) and that the hypotheses equal generate's.
"""

from itertools import pairwise

import pytest
import torch

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.translation.generate import (
    GenerationConfig,
    TranslationRequest,
    _loop_applies,
    precision_scope,
    rows_independent,
    stop_table,
    translate,
)

NEWLINE, EOS = 202, 2  # byte token "\n" and <|im_end|> of the tiny tokenizer
SOURCES = [
    "a",
    "hello there, friend",
    "xyz 123",
    "The quick brown fox jumps",
    "ok",
    "zz top",
    "Open the file menu",
    "12",
    "what?",
    "no way out of here",
]
PAIRS = ("en-de", "en-fi", "en-cs")

pytestmark = pytest.mark.usefixtures("one_thread")


def sharpened(family: str = "qwen2", seed: int = 1):
    """A tiny model whose greedy outputs differ between inputs, and whose rows end at varied steps."""
    model = tiny_model(family, seed=seed, tie_word_embeddings=False).requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = (
                8 if ("q_proj.weight" in name or "k_proj.weight" in name) else 10 if "lm_head" in name else 1
            )
            param.mul_(scale)
    model.lm_head.register_forward_hook(_row_ends)
    return model


def _row_ends(_module, args, logits):
    """Force "\\n" or end-of-sequence on a row by a hash of its own hidden state (about 1 step in 5)."""
    code = (args[0].float().sum(-1, keepdim=True) * 16).round().long() % 10
    ends = torch.where(code == 0, NEWLINE, torch.where(code == 1, EOS, -1))
    return logits.scatter(-1, ends.clamp(min=0), 1e4).where(ends >= 0, logits)


def head_rows(model) -> list[int]:
    """Rows the output head sees at every call, recorded into the returned list."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    return rows


def both_paths(model, requests, config, batch_context=None) -> tuple[list[str], list[str], int, int]:
    """(loop hypotheses, generate hypotheses, head rows of the loop, head rows of generate)."""
    rows = head_rows(model)
    new = translate(
        model,
        tiny_tokenizer(),
        requests,
        config,
        batch_context,
        progress=False,
        decoder=loop(model, config.precision),
    )
    new_rows = sum(rows)
    rows.clear()
    old = translate(
        model, tiny_tokenizer(), requests, config, batch_context, progress=False, decoder="generate"
    )
    return new, old, new_rows, sum(rows)


def loop(model, precision: str = "training") -> str:
    """The bucketed decoder the default chose before continuous batching: shrink where rows are independent
    (under the precision it decodes with)."""
    with precision_scope(model, precision):
        return "shrink" if rows_independent(model) else "loop"


def requests_of(pairs=("en-de",)) -> list[TranslationRequest]:
    return [TranslationRequest(*pairs[i % len(pairs)].split("-"), source) for i, source in enumerate(SOURCES)]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_equals_generate_with_rows_ending_early(family, dtype):
    """bf16: finished rows leave the batch; float32 (row bits depend on the batch size): they stay."""
    model = sharpened(family).to(dtype)
    assert rows_independent(model) == (dtype == torch.bfloat16)
    config = GenerationConfig(batch_size=4, max_new_tokens=16, prefix_cache=False)
    new, old, new_rows, old_rows = both_paths(model, requests_of(), config)
    assert new == old
    if dtype == torch.bfloat16:
        assert new_rows < old_rows, "some rows must end before their bucket and leave the batch"
    else:
        assert new_rows == old_rows
    assert len(set(new)) > 3, "the test needs outputs that differ between inputs"


@pytest.mark.parametrize(
    "float32_lora, precision", [(True, "weights"), (True, "training"), (False, "weights")]
)
def test_peft_lora_equals_generate(float32_lora, precision):
    """On a bf16 base: float32 LoRAs computed in float32 (`weights`) keep finished rows (row bits);
    under the training autocast (`training`) or as bf16 LoRAs they let them leave."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    peft = get_peft_model(sharpened().bfloat16(), config, autocast_adapter_dtype=float32_lora).eval()
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    assert rows_independent(peft) != float32_lora
    generation = GenerationConfig(batch_size=4, precision=precision, prefix_cache=False)
    base_out = translate(sharpened().bfloat16(), tiny_tokenizer(), requests_of(), generation)
    new, old, new_rows, old_rows = both_paths(peft, requests_of(), generation)
    stays = float32_lora and precision == "weights"
    assert new == old and (new_rows == old_rows if stays else new_rows < old_rows)
    assert new != base_out, "the LoRA must change outputs, or the test checks nothing of it"


def routed_model(lora_dtype=None):
    """bf16 base; LoRAs bf16 (lora_dtype None) so that finished rows leave the batch."""
    routed = attach_routed_lora(sharpened().bfloat16(), PAIRS, r_gen=2, r_spe=4, lora_dtype=lora_dtype).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in routed.routed_layers().values():
            for block in (layer.general, *layer.specific.values()):
                block.B.copy_(torch.randn(block.B.shape, generator=generator) * 2)
    return routed


def test_routed_mixed_batches_equal_generate_and_follow_their_rows():
    """Rows of several pairs share buckets; after rows end, every remaining row keeps its own pair."""
    routed = routed_model()
    assert rows_independent(routed)
    requests, config = (
        requests_of(PAIRS),
        GenerationConfig(batch_size=5, max_new_tokens=16, prefix_cache=False),
    )
    new, old, new_rows, old_rows = both_paths(routed, requests, config, routed.routing)
    assert new == old and new_rows < old_rows
    one_pair = [TranslationRequest("en", "de", r.source) for r in requests]
    assert new != translate(routed, tiny_tokenizer(), one_pair, config, routed.routing, progress=False), (
        "pairs must change outputs, or routing the wrong rows would go unnoticed"
    )
    assert routed.router.present == (), "the routing must be restored after translating"


@pytest.mark.parametrize("precision", ["weights", "training"])
def test_routed_float32_loras_equal_generate(precision):
    routed = routed_model(torch.float32)
    assert not rows_independent(routed)
    requests = requests_of(PAIRS)
    config = GenerationConfig(batch_size=5, max_new_tokens=16, precision=precision, prefix_cache=False)
    new, old, new_rows, old_rows = both_paths(routed, requests, config, routed.routing)
    assert new == old and (new_rows == old_rows if precision == "weights" else new_rows < old_rows)


def test_translation_sees_the_logits_training_computed():
    """`precision: training` decodes a bf16 model with float32 LoRAs under the trainer's autocast:
    the prefill logits equal, bit for bit, those of a forward inside the bf16 autocast of the trainer's
    `_forward`, and differ from float32 LoRA numerics."""
    from mlas_lora.translation.generate import _left_padded, prompt_ids

    routed = routed_model(torch.float32)
    requests = requests_of(PAIRS)[:4]
    seen: list[torch.Tensor] = []
    routed.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))

    def prefill_logits(precision: str) -> torch.Tensor:
        seen.clear()
        config = GenerationConfig(batch_size=4, max_new_tokens=1, precision=precision, prefix_cache=False)
        translate(
            routed,
            tiny_tokenizer(),
            requests,
            config,
            routed.routing,
            progress=False,
            decoder=loop(routed, precision),
        )
        return seen[0][:, -1].float()

    from mlas_lora.prompting import PromptStyle, build_prompt

    tok = tiny_tokenizer()
    ids = [
        prompt_ids(tok, build_prompt(tok, r.src_lang, r.tgt_lang, r.source), PromptStyle()) for r in requests
    ]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # the bucket's row order
    input_ids, attention = _left_padded([ids[i] for i in order], tok.pad_token_id, "cpu")
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    with (
        torch.no_grad(),
        routed.routing([requests[i].pair for i in order]),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        trained = routed(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    trained = trained[:, -1].float()
    assert torch.equal(prefill_logits("training"), trained)
    assert not torch.equal(prefill_logits("weights"), trained), "float32 LoRAs compute another function"


def test_batch_context_follows_the_rows_still_decoding():
    model = sharpened().bfloat16()
    seen: list[list[str]] = []

    class Recorder:
        def __init__(self, pairs):
            seen.append(list(pairs))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    requests = requests_of(PAIRS)
    translate(
        model,
        tiny_tokenizer(),
        requests,
        GenerationConfig(batch_size=10, prefix_cache=False),
        Recorder,
        progress=False,
        decoder="shrink",
    )
    assert sorted(seen[0]) == sorted(r.pair for r in requests), "the whole bucket comes first"
    assert len(seen) > 1 and all(len(b) < len(a) for a, b in pairwise(seen)), "then fewer rows"


def prompt_tokens(model) -> list[int]:
    """Tokens (rows x positions) of every model call, recorded into the returned list."""
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind", ["bf16", "float32", "routed"])
def test_a_shared_prompt_prefix_runs_once_per_pair(kind):
    """`prefix_cache`: the prompt prefix all rows share runs once per pair of the bucket, each row gets a
    copy of its cache, and the hypotheses stay those of the full prefill."""
    model = {"bf16": lambda: sharpened().bfloat16(), "float32": lambda: sharpened("llama")}.get(
        kind, routed_model
    )()
    context = model.routing if kind == "routed" else None
    requests = requests_of(PAIRS if kind == "routed" else ("en-de",))
    pairs_seen: list[list[str]] = []
    if context is not None:

        def context(pairs, routing=model.routing):
            pairs_seen.append(list(pairs))
            return routing(pairs)

    tokens = prompt_tokens(model)
    results = {}
    for shared in (False, True):
        tokens.clear()
        config = GenerationConfig(batch_size=5, max_new_tokens=16, prefix_cache=shared)
        results[shared] = translate(
            model, tiny_tokenizer(), requests, config, context, progress=False, decoder=loop(model)
        )
        results[shared, "tokens"] = sum(tokens)
    assert results[True] == results[False] and len(set(results[True])) > 3
    assert results[True, "tokens"] < results[False, "tokens"], "the shared prefix must run fewer tokens"
    if kind == "routed":  # each bucket: one row per pair for the prefix, then all rows
        prefix_passes = [p for p in pairs_seen if len(p) == len(set(p)) and len(p) < 5]
        assert any(sorted(p) == sorted(PAIRS) for p in prefix_passes)


def test_shared_prefix_leaves_every_row_a_token():
    from mlas_lora.translation.generate import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 5, 3]]) == 1
    assert shared_prefix([[7], [7]]) == 0


def test_rows_stop_at_the_bucket_budget():
    """A row that never ends gets the bucket's token budget, like max_new_tokens in generate."""
    model = tiny_model(seed=2)  # no stop hook: rows rarely end
    requests = requests_of()
    config = GenerationConfig(batch_size=4, length_ratio=0.0, length_margin=3, prefix_cache=False)
    new, old, new_rows, old_rows = both_paths(model, requests, config)
    assert new == old
    assert new_rows == old_rows == 3 * len(requests), "every row decodes exactly 3 tokens"


def test_stop_table_matches_generate_stop_strings():
    tok = tiny_tokenizer()
    assert stop_table(tok, 264).nonzero().squeeze(1).tolist() == [EOS, NEWLINE]


def test_processors_in_generation_config_and_beams_use_generate():
    model = tiny_model()
    assert _loop_applies(model, GenerationConfig())
    assert not _loop_applies(model, GenerationConfig(num_beams=2))
    model.generation_config.repetition_penalty = 1.3
    assert not _loop_applies(model, GenerationConfig())
    requests = requests_of()[:3]
    config = GenerationConfig(max_new_tokens=4)
    assert translate(model, tiny_tokenizer(), requests, config, progress=False) == translate(
        model, tiny_tokenizer(), requests, config, progress=False, decoder="generate"
    )
