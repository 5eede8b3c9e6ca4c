"""Tiny causal LMs (Qwen2, Llama, Gemma2) and a byte-level tokenizer built in-process.

Teacher configs are wider and deeper than student configs so the transfer stage has work to do.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 4 specials = 260 ids); no training, no files."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


VOCAB = 260

_FAMILIES = {
    "qwen2": dict(model_type="qwen2"),
    "llama": dict(model_type="llama"),
    "gemma2": dict(model_type="gemma2", query_pre_attn_scalar=16, sliding_window=64),
}


def tiny_config(family: str = "qwen2", role: str = "student", **overrides):
    """Config of a tiny model: student 2 layers / hidden 32 / head_dim 8, teacher 4 / 64 / 16."""
    from transformers import AutoConfig

    sizes = {
        "student": dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
        "teacher": dict(
            num_hidden_layers=4,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    }[role]
    kwargs = dict(_FAMILIES[family])
    model_type = kwargs.pop("model_type")
    kwargs.update(sizes)
    kwargs.update(
        vocab_size=VOCAB,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str = "qwen2", role: str = "student", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in float32, eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, role, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def save_tiny(path, family: str = "qwen2", role: str = "student", seed: int = 0):
    """Write a tiny model and tokenizer as a normal Hugging Face checkpoint directory."""
    model = tiny_model(family, role, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
