"""Incremental decoding of a PEFT prefix-tuned model (P-Tuning v2), which PEFT's own path loses.

PEFT's PrefixTuning forward builds a cache that already holds the virtual tokens' keys and values and
hands it to the base model as `past_key_values`, with the attention mask widened by the virtual
tokens. Transformers 5 renamed that argument `cache`: `past_key_values` is still accepted alone (so a
full forward, hence training, sees the prefix), but when `cache` is given too, as `generate` and
translate's greedy loop both give it, `past_key_values` is dropped with a FutureWarning. Measured on
peft 0.21.2 / transformers 5.24 with the tiny Qwen2, Llama and Gemma 2 models: both decode the base
model as if there were no prefix.

`PrefixDecoder` wraps the PeftModel for `translate`: when a call comes with an empty cache it writes
the prefix (PEFT's `get_prompt`) into that cache, then runs the base model with the mask widened by
the virtual tokens and the positions moved past them, as PEFT's training forward places them (prefix
in cache slots 0..n-1, the first real token at position n). The loop then grows, and shrinks
(`batch_select_indices`), a cache that holds the prefix like any other past. Beam search (`generate`)
is not supported: it raises.
"""

from __future__ import annotations

import torch
from torch import nn

from mlas_lora.errors import MlasLoraError


class PrefixDecoder(nn.Module):
    """A PEFT prefix-tuning model called as a causal LM with an explicit cache (translate's loop)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft = peft_model
        self.n_virtual = peft_model.active_peft_config.num_virtual_tokens

    @property
    def base(self) -> nn.Module:
        return self.peft.get_base_model()

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def write_prefix(self, cache, batch: int) -> None:
        """Append the prefix keys and values of every layer to an empty `cache` for `batch` rows."""
        if cache.get_seq_length() != 0:
            raise MlasLoraError("the prefix goes into an empty cache, before the prompt")
        prompt = self.peft.get_prompt(batch, max_cache_len=-1)
        for index, layer in enumerate(prompt.layers):
            cache.update(layer.keys, layer.values, index)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, **kwargs):
        from transformers import DynamicCache

        batch = input_ids.shape[0]
        if cache is None:
            cache = DynamicCache(config=self.config)
        if cache.get_seq_length() == 0:
            self.write_prefix(cache, batch)
        if attention_mask is not None:
            prefix = attention_mask.new_ones(batch, self.n_virtual)
            attention_mask = torch.cat([prefix, attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + self.n_virtual
        return self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        raise MlasLoraError(
            "a prefix-tuned model decodes through translate's greedy loop (num_beams: 1); PEFT's generate "
            "drops the prefix under transformers 5 (see mlas_lora.adapters.prefix_decoding)"
        )
