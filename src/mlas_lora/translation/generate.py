"""Batched translation with a causal LM: length-bucketed batches, greedy or beam search.

The prompt comes from `mlas_lora.prompting` so generation sees exactly what training saw.
A batch may mix directions; `batch_context` lets a routed multi-LoRA model learn, per batch,
which pair each row belongs to.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mlas_lora.data.records import Example
from mlas_lora.prompting import PromptStyle, build_prompt, prompt_ids


@dataclass(frozen=True)
class GenerationConfig:
    """How translations are generated."""

    batch_size: int = 8
    """Segments per generate() call; batches are formed from prompts of similar length."""
    num_beams: int = 1
    """1 = greedy decoding (the paper's setting)."""
    length_ratio: float = 2.0
    """max_new_tokens = length_ratio * source tokens + length_margin (capped at max_new_tokens)."""
    length_margin: int = 8
    max_new_tokens: int = 256
    chat: bool | None = None
    """Wrap prompts in the chat template: True, False, or None for 'if the tokenizer has one'."""


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


def clean_output(text: str) -> str:
    """The translation is the first line of what the model wrote, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def _new_token_budget(tokenizer, requests: Sequence[TranslationRequest], config: GenerationConfig) -> int:
    longest = max(len(tokenizer(r.source, add_special_tokens=False)["input_ids"]) for r in requests)
    return min(config.max_new_tokens, math.ceil(config.length_ratio * longest) + config.length_margin)


def _length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@contextlib.contextmanager
def contiguous_head_input(model) -> Iterator[None]:
    """Make the output head's input contiguous while generating (a CPU speed workaround).

    At each prefill, transformers feeds the head the last position, `hidden[:, -1:, :]`, a
    non-contiguous [batch, 1, hidden] view. When the head's weight does not require grad (any
    frozen base: PEFT, the routed student, `merged`), `torch.matmul` does not fold that view into
    one mm: it expands the [vocab, hidden] weight over the batch and copies it (2.7 GB and about 5 s
    per prefill for 10 rows over a 152k vocabulary on 2 CPU cores; pytorch/pytorch#186148).
    Copying the [batch, 1, hidden] input instead costs nothing. Outputs are unchanged.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


@torch.inference_mode()
def _generate_batch(model, tokenizer, batch_ids: list[list[int]], max_new: int, config: GenerationConfig):
    width = max(len(ids) for ids in batch_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    with contiguous_head_input(model):
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=config.num_beams,
            eos_token_id=_stop_ids(tokenizer),
            pad_token_id=pad,
            stop_strings=["\n"],
            tokenizer=tokenizer,  # the translation is the first line: stop there
        )
    return [clean_output(tokenizer.decode(seq[width:], skip_special_tokens=True)) for seq in out]


def translate(
    model,
    tokenizer,
    requests: Sequence[TranslationRequest],
    config: GenerationConfig = GenerationConfig(),
    batch_context: Callable[[list[str]], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    desc: str = "translate",
) -> list[str]:
    """Translate every request; returns hypotheses in the order of `requests`."""
    if not requests:
        return []
    style = PromptStyle(chat=config.chat)
    ids = [
        prompt_ids(
            tokenizer, build_prompt(tokenizer, r.src_lang, r.tgt_lang, r.source, r.demos, style), style
        )
        for r in requests
    ]
    hypotheses: list[str] = [""] * len(requests)
    buckets = _length_buckets([len(i) for i in ids], config.batch_size)
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="seg")
    for bucket in buckets:
        batch_requests = [requests[i] for i in bucket]
        max_new = _new_token_budget(tokenizer, batch_requests, config)
        context = (
            batch_context([r.pair for r in batch_requests]) if batch_context else contextlib.nullcontext()
        )
        with context:
            outputs = _generate_batch(model, tokenizer, [ids[i] for i in bucket], max_new, config)
        for i, text in zip(bucket, outputs, strict=True):
            hypotheses[i] = text
        bar.update(len(bucket))
    bar.close()
    return hypotheses
