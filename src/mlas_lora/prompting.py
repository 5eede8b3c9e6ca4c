"""The paper's translation prompt, owned in one place so training and inference cannot drift.

Template (Sec. 4.1): `Translate the following text from {SRC} to {TGT}.` then `{SRC}: <source>`,
and `{TGT}:` to complete. With a chat model the instruction and source form the user turn and
the assistant turn is pre-filled with `{TGT}:`. In-context demonstrations are earlier turns of the
same conversation (user: the instruction and the demo source; assistant: `{TGT}: <reference>`):
put inside one user turn, small instruct models were seen translating the demonstrations instead
of the source. Without a chat template the demonstrations are stacked in one plain-text prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlas_lora.data.records import Example
from mlas_lora.languages import language_name


@dataclass(frozen=True)
class PromptStyle:
    """How prompts are wrapped: `chat` True/False, or None to use the chat template if there is one."""

    chat: bool | None = None


def _user_text(src_lang: str, tgt_lang: str, source: str, demos: Sequence[Example]) -> str:
    src, tgt = language_name(src_lang), language_name(tgt_lang)
    lines = [f"Translate the following text from {src} to {tgt}."]
    for demo in demos:
        lines.append(f"{src}: {demo.source}\n{tgt}: {demo.reference}\n")
    lines.append(f"{src}: {source}")
    return "\n".join(lines)


def uses_chat(tokenizer, style: PromptStyle = PromptStyle()) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    return has_template if style.chat is None else (style.chat and has_template)


def build_prompt(
    tokenizer,
    src_lang: str,
    tgt_lang: str,
    source: str,
    demos: Sequence[Example] = (),
    style: PromptStyle = PromptStyle(),
) -> str:
    """The prompt text that ends where the translation should begin (after `{TGT}:`)."""
    tgt = language_name(tgt_lang)
    if not uses_chat(tokenizer, style):
        return f"{_user_text(src_lang, tgt_lang, source, demos)}\n{tgt}:"
    messages = []
    for demo in demos:
        messages.append({"role": "user", "content": _user_text(src_lang, tgt_lang, demo.source, ())})
        messages.append({"role": "assistant", "content": f"{tgt}: {demo.reference}"})
    messages.append({"role": "user", "content": _user_text(src_lang, tgt_lang, source, ())})
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{chat}{tgt}:"


def target_text(tokenizer, reference: str) -> str:
    """What the model is trained to produce after the prompt: ` reference` then end-of-sequence."""
    eos = tokenizer.eos_token or ""
    return f" {reference}{eos}"


def training_ids(
    tokenizer, example: Example, style: PromptStyle = PromptStyle()
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, target) for one training example; loss goes on the target only."""
    prompt = build_prompt(tokenizer, example.src_lang, example.tgt_lang, example.source, style=style)
    prompt_ids = tokenizer(prompt, add_special_tokens=not uses_chat(tokenizer, style))["input_ids"]
    target_ids = tokenizer(target_text(tokenizer, example.reference), add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(target_ids)


def prompt_ids(tokenizer, prompt: str, style: PromptStyle = PromptStyle()) -> list[int]:
    """Tokenise a built prompt the same way for training and generation."""
    return list(tokenizer(prompt, add_special_tokens=not uses_chat(tokenizer, style))["input_ids"])
