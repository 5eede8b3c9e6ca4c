"""`p-tuning`: P-Tuning v2 (Liu et al., 2022), deep prompt tuning: Table 1's P-tuning row.

The paper cites P-Tuning v2: trainable prefix keys and values at every layer, which is PEFT's
`PrefixTuningConfig` (PEFT's PromptEncoderConfig is P-Tuning v1, input-layer prompts only). The
prefix P (n virtual tokens x layers x 2 (key, value) x kv_dim, kv_dim = kv_heads x head_dim) is made
by the reparameterisation MLP of prefix tuning (Li & Liang, 2021; P-Tuning v2 keeps it as an option),
PEFT's `prefix_projection`: P = W2 tanh(W1 E + b1) + b2 from an embedding E of n x kv_dim, so

    params = n kv_dim + (kv_dim + 1) H + (H + 1) x layers x 2 x kv_dim        (H: MLP width)

Settings (`options`), and why:
- `num_virtual_tokens` (default 16; P-Tuning v2 uses 4 to a few hundred): every virtual token takes
  attention mass from the real ones, and even a zero prefix does. Measured on Qwen2.5-0.5B (two
  prompts with their references, mean token loss; base model 2.99): zero-initialised prefix of 16
  tokens 3.09, 64 tokens 3.29, 128 tokens 3.48.
- `prefix_projection` (default true) and `encoder_hidden_size` (default None: the H whose count is
  nearest MLAS-LoRA's trainable parameters at the same `lora` section and pairs, adapters/budget.py).
  Without the MLP the only way to reach that count is the prefix length: 3,580 virtual tokens for
  Qwen2.5-0.5B and 4 pairs at r_gen = r_spe = 8, and PEFT's N(0, 1) prefix of that length took the
  same loss to 7.34 and stayed there (it was our first version). With the MLP: H = 3,505, 21,995,057
  parameters (MLAS-LoRA: 21,995,520). `prefix_projection: false` trains the prefix itself (n x
  layers x 2 x kv_dim parameters, no matching).
- `init` (default "random"): the official start. THUDM/P-tuning-v2 @ b1520c9,
  model/prefix_encoder.py:15-24, builds the embedding and the MLP (or the prefix itself, without it)
  as torch.nn.Embedding and torch.nn.Linear and leaves them at torch's default init: E ~ N(0, 1),
  W1 and W2 kaiming-uniform (a = sqrt(5)), b1 and b2 uniform(+-1 / sqrt(fan_in)), so the prefix is
  random and not zero at step 0. PEFT's PrefixEncoder (huggingface/peft v0.21.2, the version used
  here: src/peft/tuners/prefix_tuning/model.py:58-81, a refactor of that file) does the same when
  `init_weights` is unset, which is what `init: random` passes; the draw is seeded by training.seed.
  `init: zero` is PEFT's `init_weights: "zero"` (W2, b2 = 0; without the MLP, P = 0): training then
  starts from the base model up to the dilution above (the first version's start, whose training
  key it keeps).
- the learning rate is training.lr, as for every other method (P-Tuning v2 trained its prefixes
  without the MLP at 5e-3 to 1e-2, which a system can set in its `training:` section).

Where ours differs from P-Tuning v2's code: E and each layer's keys and values are kv_dim wide
(PEFT's layout for grouped-query attention; the code's BERT / RoBERTa use hidden_size), the code's
prefix MLP is 512 wide (arguments.py:149-154; ours matched to the budget), and the code's dropout on
the prefix (model/sequence_classification.py:141, hidden_dropout_prob 0.1) is not applied (PEFT
has none).

Where ours differs from PEFT's path: decoding. Under transformers 5 PEFT's prefix is dropped by
`generate` and by any call that passes a cache (adapters/prefix_decoding.py), so the evaluation
student is a `PrefixDecoder` for translate's greedy loop; beam search is refused (problems).
Training needs nothing special: PEFT's forward prepends the virtual tokens to the attention mask and
the cache only, the logits stay [batch, seq] over the real tokens, so the trainer's boolean
`logits_to_keep` still selects the target-predicting positions (tests/test_prefix_tuning.py). PEFT
refuses gradient checkpointing with prefix tuning; our trainer does not use it. `evaluation.merge`
has nothing to merge and is ignored.

Checkpoints and the export are PEFT adapter folders (`adapter_config.json` +
`adapter_model.safetensors`, which holds the prefix P that the MLP gives) that
`PeftModel.from_pretrained` loads as they are; a checkpoint also keeps the MLP itself
(`prefix_encoder.safetensors`), from which training resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mlas_lora.adapters.budget import budget_settings
from mlas_lora.methods.base import (
    PeftFolders,
    Standalone,
    Student,
    Unrouted,
    copy_saved,
    count_trainable,
    method_options,
    student_key,
)

PREFIX_ENCODER = "prefix_encoder.safetensors"
"""A checkpoint's trainable prefix encoder (embedding and MLP): PEFT's folder keeps only its output."""
INITS = ("random", "zero")


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = 16
    """Prefix length n."""
    prefix_projection: bool = True
    """Make the prefix by the reparameterisation MLP (PEFT's prefix_projection)."""
    encoder_hidden_size: int | None = None
    """The MLP's width H; None: the H nearest MLAS-LoRA's trainable parameters."""
    init: str = "random"
    """'random' (torch's default init, as P-Tuning v2 and PEFT) or 'zero' (the prefix starts at 0)."""


def kv_width(arch) -> int:
    """Keys and values of one token at every layer: layers x 2 x kv_dim."""
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim


def prefix_parameters(arch, num_virtual_tokens: int, encoder_hidden_size: int | None = None) -> int:
    """Trainable parameters: the prefix itself (no MLP), or the embedding and the MLP."""
    if encoder_hidden_size is None:
        return num_virtual_tokens * kv_width(arch)
    kv_dim, hidden = arch.num_kv_heads * arch.head_dim, encoder_hidden_size
    return num_virtual_tokens * kv_dim + (kv_dim + 1) * hidden + (hidden + 1) * kv_width(arch)


def matching_hidden_size(arch, num_virtual_tokens: int, budget: int) -> int:
    """The MLP width whose parameter count comes nearest `budget` (at least 1)."""
    fixed = prefix_parameters(arch, num_virtual_tokens, 0)
    per_unit = prefix_parameters(arch, num_virtual_tokens, 1) - fixed
    return max(1, round((budget - fixed) / per_unit))


class PrefixTuning(Standalone, Unrouted, PeftFolders):
    name = "p-tuning"
    trains = True

    def problems(self, config) -> list[str]:
        out = []
        options = method_options(PrefixOptions, config)
        if options.num_virtual_tokens < 1:
            out.append(f"options.num_virtual_tokens must be >= 1, got {options.num_virtual_tokens}")
        if options.encoder_hidden_size is not None:
            if not options.prefix_projection:
                out.append("options.encoder_hidden_size needs options.prefix_projection: true")
            elif options.encoder_hidden_size < 1:
                out.append(
                    "options.encoder_hidden_size must be >= 1 (or null: matched), "
                    f"got {options.encoder_hidden_size}"
                )
        if options.init not in INITS:
            out.append(f"options.init: {options.init!r} (known: {', '.join(INITS)})")
        if config.generation.num_beams != 1:
            out.append(
                "p-tuning decodes greedily (generation.num_beams: 1): PEFT's generate drops the prefix"
            )
        return out

    def train_key(self, config, inputs: dict) -> dict:
        options = method_options(PrefixOptions, config)
        key = student_key(
            self.name,
            config,
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.prefix_projection,
            encoder_hidden_size=options.encoder_hidden_size,
            init=options.init,
        )
        if options.prefix_projection and options.encoder_hidden_size is None:
            key["budget"] = budget_settings(config.lora)  # the lora section sizes the MLP
        return key

    def encoder_hidden_size(self, config, arch, n_pairs: int) -> int | None:
        """The MLP's width (None: no MLP), matched to MLAS-LoRA's parameters unless set."""
        from mlas_lora.adapters.budget import mlas_lora_parameters

        options = method_options(PrefixOptions, config)
        if not options.prefix_projection:
            return None
        if options.encoder_hidden_size is not None:
            return options.encoder_hidden_size
        budget = mlas_lora_parameters(arch, config.lora, n_pairs)
        return matching_hidden_size(arch, options.num_virtual_tokens, budget)

    def build(self, config, pairs, factors=None, prior=None) -> Student:
        from peft import PrefixTuningConfig, get_peft_model

        from mlas_lora.models.arch import describe
        from mlas_lora.models.loading import load_model

        model, tokenizer = load_model(config.models.student, dtype=config.models.dtype)
        options = method_options(PrefixOptions, config)
        hidden = self.encoder_hidden_size(config, describe(model), len(pairs))
        torch.manual_seed(config.training.seed)
        peft_config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=hidden is not None,
            encoder_hidden_size=hidden,
            init_weights="zero" if options.init == "zero" else None,
        )
        return Student(get_peft_model(model, peft_config), tokenizer)

    def save(self, student, path: Path) -> None:
        """PEFT's folder (the prefix) and, for an exact resume, the trainable encoder itself."""
        from safetensors.torch import save_file

        super().save(student, path)
        trainable = {
            n: p.detach().contiguous() for n, p in student.model.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(Path(path) / PREFIX_ENCODER))

    def load(self, student, path: Path) -> None:
        """The trainable encoder from a checkpoint of ours; else PEFT's folder (no MLP to restore)."""
        from safetensors.torch import load_file

        encoder = Path(path) / PREFIX_ENCODER
        if not encoder.exists():
            return super().load(student, path)
        trainable = {n: p for n, p in student.model.named_parameters() if p.requires_grad}
        copy_saved(trainable, load_file(str(encoder)), encoder, "what this p-tuning student trains")

    def update_norms(self, student):
        """{"prefix_rms": ||P|| / sqrt(numel P)} of the prefix P the encoder gives: a prefix is not a
        change of weights, so there is no Delta W (and with `init: zero` no ||P0|| to divide by)."""
        encoder = student.model.prompt_encoder[student.model.active_adapter]
        tokens = torch.arange(student.model.active_peft_config.num_virtual_tokens)

        def norms() -> dict[str, float]:
            with torch.no_grad():
                prefix = encoder(tokens.to(encoder.embedding.weight.device)).double()
            return {"prefix_rms": float(prefix.norm() / prefix.numel() ** 0.5)}

        return norms

    def for_evaluation(self, student, merge: str) -> Student:
        """A PrefixDecoder for translate's loop (PEFT's generate would drop the prefix)."""
        from mlas_lora.adapters.prefix_decoding import PrefixDecoder

        student.model.eval()
        return Student(PrefixDecoder(student.model), student.tokenizer)

    def trainable_parameters(self, student) -> int:
        return count_trainable(student.model)


METHODS = (PrefixTuning(),)
