"""The splits an experiment uses, from the embedded corpus or from a folder of TSV files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlas_lora.data.records import Example
from mlas_lora.experiments.config import DataConfig
from mlas_lora.languages import Direction

SPLITS = ("train", "dev", "test", "ood")


@dataclass
class Splits:
    """Examples per split and direction ("en-de" -> [...])."""

    train: dict[str, list[Example]] = field(default_factory=dict)
    dev: dict[str, list[Example]] = field(default_factory=dict)
    test: dict[str, list[Example]] = field(default_factory=dict)
    ood: dict[str, list[Example]] = field(default_factory=dict)

    def get(self, split: str) -> dict[str, list[Example]]:
        return getattr(self, split)


def _limit(config: DataConfig, split: str) -> int | None:
    return {
        "train": config.train_per_direction,
        "dev": config.seed_per_direction,
        "test": config.test_per_direction,
        "ood": config.ood_per_direction,
    }[split]


def _from_embedded(direction: Direction, split: str, config: DataConfig) -> list[Example]:
    from mlas_lora.data.embedded import load_embedded

    min_words = config.min_test_words if split in ("test", "ood") else 0
    return load_embedded(direction, split, limit=_limit(config, split), min_words=min_words, seed=0)


def corpus_spec(direction: Direction, split: str, config: DataConfig) -> str | None:
    """The reader spec of one split: `corpus` as a template, or `{corpus}/{split}.{src}-{tgt}.tsv`.

    Template fields: {src}, {tgt}, {xx} (the non-English side), {split} (mapped through
    `split_names`), e.g. `hf:wmt18:{xx}-en:{split}` for WMT18 through Hugging Face datasets.
    """
    name = config.split_names.get(split, split)
    if not name:
        return None
    if "{" not in config.corpus:
        return str(Path(config.corpus) / f"{name}.{direction}.tsv")
    xx = direction.tgt if direction.src == "en" else direction.src
    return config.corpus.format(src=direction.src, tgt=direction.tgt, xx=xx, split=name)


def _english_side(example: Example) -> str:
    return example.reference if example.tgt_lang == "en" else example.source


def _from_spec(direction: Direction, split: str, config: DataConfig) -> list[Example]:
    from mlas_lora.data.readers import read_examples

    spec = corpus_spec(direction, split, config)
    if spec is None or (split == "ood" and spec.endswith(".tsv") and not Path(spec).is_file()):
        return []
    examples = read_examples(spec, direction)
    if split in ("test", "ood"):
        examples = [e for e in examples if len(_english_side(e).split()) >= config.min_test_words]
    limit = _limit(config, split)
    return examples if limit is None else examples[:limit]


def load_splits(config: DataConfig, splits=SPLITS) -> Splits:
    """Load every requested split for every configured direction."""
    reader = _from_embedded if config.corpus == "embedded" else _from_spec
    out = Splits()
    for split in splits:
        if split == "ood" and config.ood_per_direction == 0:
            continue
        for name in config.directions:
            direction = Direction.parse(name)
            out.get(split)[str(direction)] = reader(direction, split, config)
    return out
