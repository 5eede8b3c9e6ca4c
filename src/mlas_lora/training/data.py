"""Training examples as token ids, and the seeded order of micro-batches (mixed or per pair).

The order of every epoch is a pure function of (seed, epoch), so a resumed run can rebuild it
and skip exactly the micro-batches it already consumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mlas_lora.data.records import Example
from mlas_lora.prompting import PromptStyle, training_ids


@dataclass(frozen=True)
class Feature:
    """One tokenised example: ids, labels (-100 on the prompt) and its pair's index."""

    input_ids: list[int]
    labels: list[int]
    pair_index: int


def fit_to_budget(prompt: list[int], target: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """At most `max_tokens` ids: an over-long example keeps the end of the prompt, the start of the target."""
    target = target[: max(1, max_tokens // 2)] if len(prompt) + len(target) > max_tokens else target
    return prompt[-(max_tokens - len(target)) :], target


def featurize(
    tokenizer, examples: list[Example], pairs: list[str], max_tokens: int, style: PromptStyle | None = None
) -> list[Feature]:
    """Prompt + target ids; over-long examples keep the end of the prompt and the start of the target."""
    index = {p: i for i, p in enumerate(pairs)}
    style = style or PromptStyle()
    features = []
    for example in examples:
        prompt, target = fit_to_budget(*training_ids(tokenizer, example, style), max_tokens)
        features.append(Feature(prompt + target, [-100] * len(prompt) + target, index[example.pair]))
    return features


def epoch_batches(
    features: list[Feature], micro_batch: int, seed: int, epoch: int, mixed: bool
) -> list[list[int]]:
    """Micro-batches (lists of feature indices) of one epoch: shuffled; mixed-pair or one pair each."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if mixed:
        order = list(range(len(features)))
        rng.shuffle(order)
        return [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    by_pair: dict[int, list[int]] = {}
    for i, feature in enumerate(features):
        by_pair.setdefault(feature.pair_index, []).append(i)
    batches = []
    for pair in sorted(by_pair):
        members = by_pair[pair]
        rng.shuffle(members)
        batches += [members[i : i + micro_batch] for i in range(0, len(members), micro_batch)]
    rng.shuffle(batches)
    return batches


GPU_WIDTH_MULTIPLE = 8
"""On a GPU, batches are right-padded to a multiple of 8 tokens: the memory-efficient SDPA backward
refuses an attention mask whose key length is not a multiple of 4 ("attn_bias is not correctly
aligned"), and tensor cores prefer multiples of 8. The CPU keeps the exact width."""


def width_multiple(device: torch.device) -> int:
    """What a batch's width is padded to a multiple of on `device` (GPU_WIDTH_MULTIPLE on a GPU, else 1)."""
    return GPU_WIDTH_MULTIPLE if device.type == "cuda" else 1


def collate(features: list[Feature], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a training forward pass, `multiple` tokens wide (`width_multiple`);
    the pads are masked and carry no label."""
    width = max(len(f.input_ids) for f in features)
    width += -width % multiple
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids)
        labels[row, : len(f.labels)] = torch.tensor(f.labels)
        mask[row, : len(f.input_ids)] = 1
    pair_ids = torch.tensor([f.pair_index for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pair_ids": pair_ids}
