"""The splits an experiment uses, from the embedded corpus, a folder of TSV files or a reader spec.

Splits larger than their `*_per_direction` are read as streams and sampled (`data.sample`): a
seeded reservoir keeps N rows uniformly at random in O(N) memory, in corpus order. The validation
split, on which hyper-parameters are chosen, is carved from dev after the seed sentences, so it
shares no source sentence with them; the test split may come from its own corpus (`test_corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlas_lora.data.records import Example
from mlas_lora.data.sampling import take
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import DataConfig
from mlas_lora.languages import Direction

SPLITS = ("train", "dev", "valid", "test", "ood")


@dataclass
class Splits:
    """Examples per split and direction ("en-de" -> [...])."""

    train: dict[str, list[Example]] = field(default_factory=dict)
    dev: dict[str, list[Example]] = field(default_factory=dict)
    valid: dict[str, list[Example]] = field(default_factory=dict)
    test: dict[str, list[Example]] = field(default_factory=dict)
    ood: dict[str, list[Example]] = field(default_factory=dict)

    def get(self, split: str) -> dict[str, list[Example]]:
        return getattr(self, split)


def _limit(config: DataConfig, split: str) -> int | None:
    return {
        "train": config.train_per_direction,
        "dev": config.seed_per_direction,
        "valid": config.valid_per_direction,
        "test": config.test_per_direction,
        "ood": config.ood_per_direction,
    }[split]


def _from_embedded(direction: Direction, split: str, config: DataConfig) -> list[Example]:
    from mlas_lora.data.embedded import load_embedded

    min_words = config.min_test_words if split in ("test", "ood") else 0
    return load_embedded(direction, split, limit=_limit(config, split), min_words=min_words, seed=config.seed)


def _corpus_of(split: str, config: DataConfig) -> tuple[str, dict[str, str]]:
    """The corpus a split is read from and its split names: `test_corpus` for test where set."""
    if split == "test" and config.test_corpus:
        return config.test_corpus, {"test": config.test_split}
    return config.corpus, config.split_names


def corpus_spec(direction: Direction, split: str, config: DataConfig) -> str | None:
    """The reader spec of one split: its corpus as a template, or `{corpus}/{split}.{src}-{tgt}.tsv`.

    Template fields: {src}, {tgt}, {xx} (the non-English side), {split} (mapped through
    `split_names`, or `test_split` in `test_corpus`), e.g. `hf:wmt18:{xx}-en:{split}` for WMT18
    through Hugging Face datasets. Valid is carved from dev, so its spec is dev's.
    """
    split = "dev" if split == "valid" else split
    corpus, names = _corpus_of(split, config)
    name = names.get(split, split)
    if not name:
        return None
    if "{" not in corpus:
        return str(Path(corpus) / f"{name}.{direction}.tsv")
    from mlas_lora.data.readers import fill_template

    xx = direction.tgt if direction.src == "en" else direction.src
    return fill_template(corpus, src=direction.src, tgt=direction.tgt, xx=xx, split=name)


def _english_side(example: Example) -> str:
    return example.reference if example.tgt_lang == "en" else example.source


def _long_enough(example: Example, config: DataConfig) -> bool:
    return len(_english_side(example).split()) >= config.min_test_words


def sample_seed(config: DataConfig, split: str, direction: Direction) -> str:
    """The seed of one split's sample; `en-de` and `de-en` share it, so they draw the same rows."""
    return f"{config.seed}/{split}/{'-'.join(sorted((direction.src, direction.tgt)))}"


def _from_spec(direction: Direction, split: str, config: DataConfig) -> list[Example]:
    from mlas_lora.data.readers import read_examples

    spec = corpus_spec(direction, split, config)
    limit = _limit(config, split)
    if spec is None or limit == 0 or (split == "ood" and spec.endswith(".tsv") and not Path(spec).is_file()):
        return []
    examples = read_examples(spec, direction)
    if split in ("test", "ood"):
        examples = (e for e in examples if _long_enough(e, config))
    return take(examples, limit, config.sample, sample_seed(config, split, direction))


def _valid(direction: Direction, config: DataConfig, seeds: list[Example]) -> list[Example]:
    """Validation segments: dev minus the seed sentences, >= min_test_words, sampled like the rest."""
    from mlas_lora.data.readers import read_examples

    if config.corpus == "embedded":
        from mlas_lora.data.embedded import load_embedded

        dev = iter(load_embedded(direction, "dev", min_words=config.min_test_words))
    else:
        spec = corpus_spec(direction, "valid", config)
        if spec is None:
            return []
        dev = (e for e in read_examples(spec, direction) if _long_enough(e, config))
    seen = {e.source for e in seeds}
    rest = (e for e in dev if e.source not in seen)
    return take(rest, config.valid_per_direction, config.sample, sample_seed(config, "valid", direction))


def _read_split(direction: Direction, split: str, config: DataConfig) -> list[Example]:
    embedded = _corpus_of(split, config)[0] == "embedded"
    examples = (_from_embedded if embedded else _from_spec)(direction, split, config)
    spec = "embedded corpus" if embedded else corpus_spec(direction, split, config)
    if split == "test" and not examples and spec is not None and _limit(config, split) != 0:
        raise MlasLoraError(_empty_test(direction, spec, config.min_test_words))
    return examples


def _empty_test(direction: Direction, spec: str, min_words: int) -> str:
    """Why a test split came out empty, and what to change (a run would otherwise report only dashes)."""
    if min_words == 0:
        return f"data: the test split of {direction} ({spec}) is empty: add test segments to it"
    return (
        f"data: the test split of {direction} ({spec}) has no segment left after the filter "
        f"data.min_test_words={min_words} (segments whose English side has fewer words are dropped): "
        "lower data.min_test_words, or use a test set with longer segments"
    )


def load_splits(config: DataConfig, splits=SPLITS) -> Splits:
    """Load every requested split for every configured direction (valid reads the seeds of dev)."""
    out = Splits()
    skipped = {"ood": config.ood_per_direction == 0, "valid": not config.valid_per_direction}
    for split in splits:
        if skipped.get(split):
            continue
        for name in config.trained_directions if split in ("train", "dev") else config.directions:
            direction = Direction.parse(name)
            if split == "valid":
                seeds = out.dev.get(str(direction))
                if seeds is None:
                    seeds = _read_split(direction, "dev", config)
                out.valid[str(direction)] = _valid(direction, config, seeds)
            else:
                out.get(split)[str(direction)] = _read_split(direction, split, config)
    return out


def split_back(by_direction: dict[str, list], flat: list) -> dict[str, list]:
    """Cut `flat` (one item per example, directions in order) back into `by_direction`'s lists."""
    out, start = {}, 0
    for direction, examples in by_direction.items():
        out[direction], start = flat[start : start + len(examples)], start + len(examples)
    return out
