"""`p-tuning`: P-Tuning v2 (Liu et al., 2022), deep prompt tuning: Table 1's P-tuning row.

The paper cites P-Tuning v2: trainable prefix keys and values at every layer, which is PEFT's
`PrefixTuningConfig` (PEFT's PromptEncoderConfig is P-Tuning v1, input-layer prompts only). We use it
without the reparameterisation MLP (`prefix_projection: False`, PEFT's default; P-Tuning v2 finds it
task-dependent), so the trained parameters are the prefix itself:

    params = n_virtual x layers x 2 (key, value) x kv_dim        (kv_dim = kv_heads x head_dim)

`options.num_virtual_tokens` (default None) sets n; None takes the n whose count is nearest
MLAS-LoRA's trainable parameters at the same `lora` section and pairs (adapters/budget.py). For
Qwen2.5-0.5B (24 layers, kv_dim 128) and 4 pairs at r_gen = r_spe = 8 that is exactly 3,580 virtual
tokens (21,995,520 parameters), far longer than P-Tuning v2's prefixes (up to a few hundred tokens):
the price of matching parameters through a GQA model's narrow keys and values. The prefix is PEFT's
initialisation (N(0, 1) embedding, seeded by training.seed) at training.lr; P-Tuning v2 trained at
5e-3 to 1e-2, which a system can set in its `training:` section.

Where ours differs from PEFT's path: decoding. Under transformers 5 PEFT's prefix is dropped by
`generate` and by any call that passes a cache (adapters/prefix_decoding.py), so the evaluation
student is a `PrefixDecoder` for translate's greedy loop; beam search is refused (problems).
Training needs nothing special: PEFT's forward prepends the virtual tokens to the attention mask and
the cache only, the logits stay [batch, seq] over the real tokens, so the trainer's boolean
`logits_to_keep` still selects the target-predicting positions (tests/test_prefix_tuning.py). PEFT
refuses gradient checkpointing with prefix tuning; our trainer does not use it. `evaluation.merge`
has nothing to merge and is ignored.

Checkpoints and the export are PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`) that `PeftModel.from_pretrained` loads as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlas_lora.adapters.budget import budget_settings
from mlas_lora.methods.base import (
    PeftFolders,
    Standalone,
    Student,
    Unrouted,
    count_trainable,
    method_options,
    student_key,
)


@dataclass
class PrefixOptions:
    num_virtual_tokens: int | None = None
    """Prefix length n; None: the n nearest MLAS-LoRA's trainable parameters."""


def prefix_parameters(arch, num_virtual_tokens: int) -> int:
    """n x layers x 2 x kv_dim: the keys and values of every virtual token at every layer."""
    return num_virtual_tokens * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim


def matching_virtual_tokens(arch, budget: int) -> int:
    """The prefix length whose parameters come nearest `budget` (at least 1)."""
    return max(1, round(budget / prefix_parameters(arch, 1)))


class PrefixTuning(Standalone, Unrouted, PeftFolders):
    name = "p-tuning"
    trains = True

    def problems(self, config) -> list[str]:
        out = []
        n = method_options(PrefixOptions, config).num_virtual_tokens
        if n is not None and n < 1:
            out.append(f"options.num_virtual_tokens must be >= 1 (or null: matched), got {n}")
        if config.generation.num_beams != 1:
            out.append(
                "p-tuning decodes greedily (generation.num_beams: 1): PEFT's generate drops the prefix"
            )
        return out

    def train_key(self, config, inputs: dict) -> dict:
        n = method_options(PrefixOptions, config).num_virtual_tokens
        key = student_key(self.name, config, num_virtual_tokens=n)
        if n is None:  # matched to MLAS-LoRA's parameters: the lora section sizes the prefix
            key["budget"] = budget_settings(config.lora)
        return key

    def num_virtual_tokens(self, config, arch, n_pairs: int) -> int:
        from mlas_lora.adapters.budget import mlas_lora_parameters

        n = method_options(PrefixOptions, config).num_virtual_tokens
        return (
            n
            if n is not None
            else matching_virtual_tokens(arch, mlas_lora_parameters(arch, config.lora, n_pairs))
        )

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from peft import PrefixTuningConfig, get_peft_model

        from mlas_lora.models.arch import describe
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        n = self.num_virtual_tokens(config, describe(model), len(pairs))
        torch.manual_seed(config.training.seed)
        peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
        return Student(get_peft_model(model, peft_config), tokenizer)

    def update_norms(self, student):
        """{"prefix": ||P - P0|| / ||P0||} of the prefix embedding P (there is no Delta W)."""
        prefix = student.model.prompt_encoder[student.model.active_adapter].embedding.weight
        initial = prefix.detach().double().clone()

        def norms() -> dict[str, float]:
            return {"prefix": float((prefix.detach().double() - initial).norm() / initial.norm())}

        return norms

    def for_evaluation(self, student, merge: str) -> Student:
        """A PrefixDecoder for translate's loop (PEFT's generate would drop the prefix)."""
        from mlas_lora.adapters.prefix_decoding import PrefixDecoder

        student.model.eval()
        return Student(PrefixDecoder(student.model), student.tokenizer)

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (PrefixTuning(),)
