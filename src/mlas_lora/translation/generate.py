"""Batched translation with a causal LM: continuous batching for greedy decoding, beam search through
Hugging Face `generate`.

The prompt comes from `mlas_lora.prompting` so generation sees exactly what training saw.
A batch may mix directions; `batch_context` lets a routed multi-LoRA model learn, per forward,
which pair each row belongs to.

Greedy decoding (`decoder="auto"`) runs `continuous.ContinuousDecoder`: a finished row (end-of-sequence,
or the token that completes the stop string "\n") leaves the batch and the next prompt takes its slot,
and each pair's shared prompt prefix is computed once. Its hypotheses are those of decoding each row
alone up to float rounding; batch composition changes bf16 rounding, so they are not the bits of
`generate` at one batch size, which no batch size of `generate` keeps either (docs/speed.md).
`decoder="generate"` (every length bucket through `generate`) is the reference it is measured against,
and `loop` / `shrink` the bucketed greedy loop that preceded it.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.progress import progress_bar
from mlas_lora.prompting import PromptStyle, build_prompt, prompt_ids
from mlas_lora.translation.rows import MIN_SHARED_PREFIX, RowScope, contiguous_head_input, shared_prefix


@dataclass(frozen=True)
class GenerationConfig:
    """How translations are generated."""

    batch_size: int = 64
    """Rows decoded together (continuous batching keeps this many busy); for beam search and the
    bucketed decoders, the bucket size (buckets of prompts of similar length)."""
    num_beams: int = 1
    """1 = greedy decoding (the paper's setting)."""
    length_ratio: float = 2.0
    """max_new_tokens = length_ratio * source tokens + length_margin (capped at max_new_tokens)."""
    length_margin: int = 8
    max_new_tokens: int = 256
    chat: bool | None = None
    """Wrap prompts in the chat template: True, False, or None for 'if the tokenizer has one'."""
    prefix_cache: bool = True
    """Greedy decoding: run the prompt prefix that every prompt of a direction shares (the chat
    template's system turn and the instruction) once per pair, and give each row a copy of its KV
    cache, instead of running it for every row. The same function up to float rounding."""
    precision: str = "training"
    """'training': a bfloat16 model with float32 parts (PEFT and routed LoRAs, adapters) decodes under
    the bfloat16 autocast its training ran under, so the translated function is the trained one, bit
    for bit, and its rows do not depend on each other (finished rows leave the batch); 'weights': every
    module computes in its own weights' dtype (float32 LoRAs in float32 on the bf16 base: the default
    before 2026-11-27, a slightly different function from the one trained)."""

    def problems(self) -> list[str]:
        out = [
            f"generation.{name} must be >= 1, got {value!r}"
            for name, value in (
                ("batch_size", self.batch_size),
                ("num_beams", self.num_beams),
                ("max_new_tokens", self.max_new_tokens),
            )
            if value < 1
        ]
        if self.length_ratio < 0 or self.length_margin < 0:
            out.append("generation.length_ratio and generation.length_margin must be >= 0")
        if self.precision not in PRECISIONS:
            out.append(f"generation.precision: {self.precision!r} (known: {', '.join(PRECISIONS)})")
        return out


PRECISIONS = ("training", "weights")


@dataclass(frozen=True)
class TranslationRequest:
    """One segment to translate, with optional in-context demonstrations."""

    src_lang: str
    tgt_lang: str
    source: str
    demos: tuple[Example, ...] = ()

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"


MAX_SOURCE_TOKENS = 1024
"""A source segment (or an in-context demonstration's side) longer than this many tokens is cut to
them before decoding, so one runaway line cannot ask for gigabytes (a 100k-character line asked for
11 GB on a 2-layer model). Four times training's `max_tokens` (256, prompt and target together); the
embedded corpus's longest segment has 313. Not a config field: the generation settings enter the
hypothesis keys, and no segment of a run made before is affected."""


def bounded_request(tokenizer, request: TranslationRequest) -> TranslationRequest:
    """`request` with its source and demonstrations cut to MAX_SOURCE_TOKENS tokens each (itself,
    unchanged, when nothing is that long)."""

    def cut(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= MAX_SOURCE_TOKENS else tokenizer.decode(ids[:MAX_SOURCE_TOKENS])

    source = cut(request.source)
    demos = tuple(replace(d, source=cut(d.source), reference=cut(d.reference)) for d in request.demos)
    if source == request.source and demos == request.demos:
        return request
    return replace(request, source=source, demos=demos)


def clean_output(text: str) -> str:
    """The translation is the first line of what the model wrote, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def _row_budget(tokenizer, request: TranslationRequest, config: GenerationConfig) -> int:
    """max_new_tokens of one row: length_ratio x its source tokens + length_margin, capped."""
    source = len(tokenizer(request.source, add_special_tokens=False)["input_ids"])
    return min(config.max_new_tokens, math.ceil(config.length_ratio * source) + config.length_margin)


def _new_token_budget(tokenizer, requests: Sequence[TranslationRequest], config: GenerationConfig) -> int:
    """A bucket's max_new_tokens (the bucketed decoders): the budget of its longest source."""
    return max(_row_budget(tokenizer, r, config) for r in requests)


def _length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


STOP_STRING = "\n"
"""The translation is the first line: decoding stops at the token that completes it."""

GREEDY_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
}
"""Model generation_config fields whose other values make `generate` change greedy logits; a model
that sets one is decoded with `generate` (the loop applies no logits processors)."""


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the attention mask, as `generate` gives them (padding at 0)."""
    return (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)


def _left_padded(batch_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left padded: every prompt ends at the last column."""
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


@torch.inference_mode()
def _generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new: int, config: GenerationConfig):
    """One bucket through Hugging Face `generate` (beam search, and the reference for the loop)."""
    pad = _pad_id(tokenizer)
    input_ids, attention = _left_padded(batch_ids, pad, next(model.parameters()).device)
    with contiguous_head_input(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=config.num_beams,
            eos_token_id=_stop_ids(tokenizer),
            pad_token_id=pad,
            stop_strings=[STOP_STRING],
            tokenizer=tokenizer,  # the translation is the first line: stop there
        )
    width = input_ids.shape[1]
    return [clean_output(tokenizer.decode(seq[width:], skip_special_tokens=True)) for seq in out]


_STOP_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """`_stop_table`, computed once per tokenizer and vocabulary size (about 1 s over a 152k vocabulary)."""
    tables = _STOP_TABLES.setdefault(tokenizer, {})
    if vocab_size not in tables:
        tables[vocab_size] = _stop_table(tokenizer, vocab_size)
    return tables[vocab_size]


def _stop_table(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bool [vocab_size]: the tokens that end a row, the end-of-sequence ids and those completing "\\n".

    Asks Hugging Face's own StopStringCriteria about every token on its own, so the loop stops where
    `generate(stop_strings=["\\n"])` stops (a one-character stop string lies within the last token).
    """
    from transformers.generation.stopping_criteria import StopStringCriteria

    criterion = StopStringCriteria(tokenizer, [STOP_STRING])
    known = min(vocab_size, criterion.embedding_vec.shape[0])
    table = torch.zeros(vocab_size, dtype=torch.bool)
    table[:known] = criterion(torch.arange(known)[:, None], None)
    table[[i for i in _stop_ids(tokenizer) if i < vocab_size]] = True
    return table


def _loop_applies(model, config: GenerationConfig) -> bool:
    """Greedy, and no logits processor in the model's generation_config that the loop would skip."""
    defaults = getattr(model, "generation_config", None)
    return config.num_beams == 1 and all(
        getattr(defaults, name, None) in neutral for name, neutral in GREEDY_NEUTRAL.items()
    )


def _prefill_shared_prefix(model, batch_ids, shared: int, cache, scope: RowScope, pad: int, device):
    """Run the `shared` prefix once per pair of the batch into `cache`, copy it to every row, and return
    (suffix input_ids, attention mask over prefix + suffix, suffix position ids) for the prefill."""
    pairs = scope.pairs
    firsts = [pairs.index(pair) for pair in dict.fromkeys(pairs)]
    scope.set(firsts)  # one row per pair: a routed model's prefix depends on the pair's LoRAs
    prefix = torch.tensor([list(batch_ids[0][:shared])] * len(firsts), device=device)
    model(
        input_ids=prefix,
        attention_mask=torch.ones_like(prefix),
        position_ids=torch.arange(shared, device=device).expand(len(firsts), -1),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    owner = {pairs[row]: k for k, row in enumerate(firsts)}
    cache.batch_select_indices(torch.tensor([owner[p] for p in pairs], device=device))
    scope.set(list(range(len(batch_ids))))
    input_ids, suffix = _left_padded([ids[shared:] for ids in batch_ids], pad, device)
    attention = torch.cat([suffix.new_ones(len(batch_ids), shared), suffix], dim=1)
    positions = _positions(attention)[:, shared:]
    return input_ids, attention, positions


@torch.inference_mode()
def _greedy_batch(
    model,
    tokenizer,
    batch_ids,
    max_new: int,
    stops: torch.Tensor,
    scope: RowScope,
    shrink: bool,
    prefix_cache: bool = False,
):
    """Greedy decoding of one bucket; with `shrink`, a finished row leaves the batch and the KV cache.

    The model sees what `generate` gives it: left-padded prompts, position ids counted over the
    attention mask, logits of the last position only, then one token per row and step (padding
    for a finished row that stays, as `generate` feeds it). With `prefix_cache`, the prompt prefix
    all rows share is run once per pair first (`_prefill_shared_prefix`), the padding after it.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    cache = DynamicCache(config=model.config)
    rows = list(range(len(batch_ids)))  # the bucket row of each row in the batch
    finished = torch.zeros(len(rows), dtype=torch.bool)
    generated: list[list[int]] = [[] for _ in rows]
    try:
        shared = shared_prefix(batch_ids) if prefix_cache and len(batch_ids) > 1 else 0
        if shared >= MIN_SHARED_PREFIX:
            input_ids, attention, positions = _prefill_shared_prefix(
                model, batch_ids, shared, cache, scope, pad, device
            )
        else:
            input_ids, attention = _left_padded(batch_ids, pad, device)
            positions = _positions(attention)
            scope.set(rows)
        with contiguous_head_input(model):
            for step in range(max_new):
                logits = model(
                    input_ids=input_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits
                tokens = logits[:, -1].float().argmax(-1).cpu().masked_fill(finished, pad)
                for row, token, ended in zip(rows, tokens.tolist(), finished.tolist(), strict=True):
                    if not ended:
                        generated[row].append(token)
                finished = finished | stops[tokens]
                if step == max_new - 1 or bool(finished.all()):
                    break
                if shrink and bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(1)
                    rows = [rows[k] for k in keep.tolist()]
                    tokens, finished, keep = tokens[keep], finished[keep], keep.to(device)
                    cache.batch_select_indices(keep)
                    attention, positions = attention[keep], positions[keep]
                    scope.set(rows)
                input_ids = tokens[:, None].to(device)
                attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        scope.close()
    return [clean_output(tokenizer.decode(ids, skip_special_tokens=True)) for ids in generated]


def rows_independent(model) -> bool:
    """Whether a row's logits keep their bits when other rows leave the batch: bf16 GEMMs on CPU.

    Measured on torch 2.13: a CPU bf16 GEMM (oneDNN) gives every row the same bits for any number of
    rows (and any thread count), but a float32 one (MKL) does not, e.g. 5 rows vs 8. So rows are
    independent when every weight is bf16, or under a CPU bf16 autocast (every GEMM then runs in
    bf16, float32 LoRAs included: `precision: training`); a model with float32 GEMMs (a float32
    model, or float32 LoRAs on a bf16 base with `precision: weights`) keeps finished rows in the
    batch, as `generate` does, and only skips generate's overheads.
    """
    params = list(model.parameters())
    if params[0].device.type != "cpu":
        return False
    if all(p.dtype == torch.bfloat16 for p in params if p.is_floating_point()):
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def trains_under_autocast(model) -> bool:
    """The trainer's rule: a model whose first parameter is bf16 trains under a bf16 autocast."""
    return next(model.parameters()).dtype == torch.bfloat16


def precision_scope(model, precision: str) -> contextlib.AbstractContextManager:
    """The numerics `translate` decodes with (GenerationConfig.precision): under `training`, the bf16
    autocast the trainer runs (`Trainer._forward`) for a bf16 model that
    has float32 parts; otherwise nothing (an all-bf16 or float32 model computes as its weights say)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    mixed = any(p.dtype != torch.bfloat16 for p in params)
    if precision == "training" and mixed and trains_under_autocast(model):
        return torch.autocast(params[0].device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


GREEDY_DECODER = "continuous"
"""What `decoder="auto"` decodes greedily with. It enters the translation keys of experiments, so the
hypotheses of an earlier default decoder (the bucketed loop, whose outputs differ by batch rounding) are
translated again rather than mixed with new ones in one table."""

DECODERS = ("auto", "continuous", "generate", "loop", "shrink")
"""How `translate` decodes greedily: `auto` (`continuous` where it applies, else `loop` for a sliding
window shorter than a prompt plus its budget, and `generate` for beams or logits processors),
`continuous` (continuous batching, `continuous.py`), `generate` (Hugging Face `generate` for every
length bucket: the reference the others are benchmarked against), `loop` (the bucketed greedy loop,
finished rows stay) or `shrink` (the bucketed loop, finished rows leave the bucket)."""


def translate(
    model,
    tokenizer,
    requests: Sequence[TranslationRequest],
    config: GenerationConfig = GenerationConfig(),
    batch_context: Callable[[list[str]], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    desc: str = "translate",
    decoder: str = "auto",
) -> list[str]:
    """Translate every request; returns hypotheses in the order of `requests` (`decoder`: DECODERS).

    Greedy decoding uses the loop (shrinking the batch where that keeps generate's bits); beam
    search, and a model whose generation_config asks for logits processors, go through `generate`.
    """
    if decoder not in DECODERS:
        raise MlasLoraError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if problems := config.problems():
        raise MlasLoraError("; ".join(problems))
    with precision_scope(model, config.precision):
        if decoder == "auto":
            decoder = GREEDY_DECODER if _loop_applies(model, config) else "generate"
        return _translate(model, tokenizer, requests, config, batch_context, progress, desc, decoder)


def _translate(model, tokenizer, requests, config, batch_context, progress, desc, decoder: str) -> list[str]:
    if not requests:
        return []
    requests = [bounded_request(tokenizer, r) for r in requests]
    style = PromptStyle(chat=config.chat)
    ids = [
        prompt_ids(
            tokenizer, build_prompt(tokenizer, r.src_lang, r.tgt_lang, r.source, r.demos, style), style
        )
        for r in requests
    ]
    loop = decoder != "generate"
    stops = stop_table(tokenizer, _vocab_size(model)) if loop else None
    if decoder == "continuous":
        budgets = [_row_budget(tokenizer, r, config) for r in requests]
        if _fits_sliding_window(model, ids, budgets):
            return _translate_continuous(
                model, tokenizer, requests, ids, budgets, config, batch_context, stops, progress, desc
            )
        decoder, config = "loop", replace(config, prefix_cache=False)  # a prefix would move the window
    hypotheses: list[str] = [""] * len(requests)
    buckets = _length_buckets([len(i) for i in ids], config.batch_size)
    bar = progress_bar(desc=desc, total=len(requests), unit="seg", show=progress)
    for bucket in buckets:
        batch_requests = [requests[i] for i in bucket]
        max_new = _new_token_budget(tokenizer, batch_requests, config)
        batch_ids = [ids[i] for i in bucket]
        if loop:
            scope = RowScope(batch_context, [r.pair for r in batch_requests])
            outputs = _greedy_batch(
                model, tokenizer, batch_ids, max_new, stops, scope, decoder == "shrink", config.prefix_cache
            )
        else:
            context = (
                batch_context([r.pair for r in batch_requests]) if batch_context else contextlib.nullcontext()
            )
            with context:
                outputs = _generate_batch(model, tokenizer, batch_ids, max_new, config)
        for i, text in zip(bucket, outputs, strict=True):
            hypotheses[i] = text
        bar.update(len(bucket))
    bar.close()
    return hypotheses


def _fits_sliding_window(model, ids: list[list[int]], budgets: list[int]) -> bool:
    """Whether every prompt plus its budget fits the model's shortest sliding window (if it has one):
    continuous batching rebuilds caches, which a sliding layer would cut at its window."""
    from mlas_lora.translation.continuous import sliding_window_limit

    window = sliding_window_limit(model)
    if window is None:
        return True
    return max(len(p) + b for p, b in zip(ids, budgets, strict=True)) < window


def _translate_continuous(
    model, tokenizer, requests, ids, budgets, config, batch_context, stops, progress, desc
):
    from mlas_lora.translation.continuous import ContinuousDecoder, Row

    rows = [
        Row(i, r.pair, prompt, budget)
        for i, (r, prompt, budget) in enumerate(zip(requests, ids, budgets, strict=True))
    ]
    decoder = ContinuousDecoder(
        model,
        stops,
        _pad_id(tokenizer),
        batch_context=batch_context,
        batch_size=config.batch_size,
        prefix_cache=config.prefix_cache,
    )
    with progress_bar(desc=desc, total=len(requests), unit="seg", show=progress) as bar:
        generated = decoder.decode(rows, bar)
    return [clean_output(tokenizer.decode(generated[i], skip_special_tokens=True)) for i in range(len(rows))]
