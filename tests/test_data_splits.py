"""Sampling of splits (seeded reservoir, first N), the validation split, and a test corpus of its own."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from mlas_lora.config import config_from_dict
from mlas_lora.data.cleaning import unit_hash
from mlas_lora.data.sampling import reservoir_sample, take
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import DataConfig, ExperimentConfig
from mlas_lora.experiments.data import load_splits


def test_reservoir_sample_is_seeded_sized_in_stream_order_and_not_the_first_n():
    sample = reservoir_sample(iter(range(1000)), 100, seed="s")
    assert len(sample) == 100 and len(set(sample)) == 100
    assert sample == sorted(sample)  # stream order
    assert sample == reservoir_sample(range(1000), 100, seed="s")
    assert sample != reservoir_sample(range(1000), 100, seed="t")
    assert sample != list(range(100))
    assert reservoir_sample(range(7), 100, seed="s") == list(range(7))
    assert reservoir_sample(range(7), 0, seed="s") == []


def test_reservoir_sample_is_uniform():
    """Each tenth of the stream gets its share (1/10 of the draws, 2,000 here; the spread is about
    +-40, so +-200 is five standard deviations), the first tenth included."""
    counts = Counter(x // 100 for seed in range(200) for x in reservoir_sample(range(1000), 100, seed))
    assert sum(counts.values()) == 200 * 100
    assert all(1800 <= counts[tenth] <= 2200 for tenth in range(10)), counts


class _Tracked:
    """An item that counts how many of its kind are alive."""

    live = 0
    peak = 0

    def __init__(self, i: int):
        self.i = i
        _Tracked.live += 1
        _Tracked.peak = max(_Tracked.peak, _Tracked.live)

    def __del__(self):
        _Tracked.live -= 1


def test_reservoir_keeps_only_n_items_alive():
    _Tracked.live = _Tracked.peak = 0
    sample = reservoir_sample((_Tracked(i) for i in range(20_000)), 50, seed=0)
    assert len(sample) == 50 and [x.i for x in sample] == sorted(x.i for x in sample)
    assert _Tracked.peak <= 52  # the reservoir, the item in hand, the next one: O(N), not O(stream)


def test_take_first_reads_no_further_than_n():
    consumed = []

    def stream():
        for i in range(1000):
            consumed.append(i)
            yield i

    assert take(stream(), 5, "first", seed=0) == [0, 1, 2, 3, 4]
    assert consumed == [0, 1, 2, 3, 4]
    assert take(range(3), None, "random", seed=0) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown sampling 'some'"):
        take(range(3), 2, "some", seed=0)


def _tsv(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(f"{s}\t{r}\n" for s, r in rows), encoding="utf-8")


def _sentence(i: int, words: int = 5) -> str:
    return " ".join([f"w{i}"] + ["word"] * (words - 1))


def _corpus(folder, n_train=200, n_dev=40, n_test=20):
    """A TSV folder for en-de; every third dev row is short (2 English words)."""
    _tsv(folder, "train.en-de.tsv", [(_sentence(i), f"T{i}") for i in range(n_train)])
    _tsv(
        folder,
        "dev.en-de.tsv",
        [(_sentence(i, 2 if i % 3 == 0 else 5), f"D{i}") for i in range(1000, 1000 + n_dev)],
    )
    _tsv(folder, "test.en-de.tsv", [(_sentence(i), f"E{i}") for i in range(2000, 2000 + n_test)])
    return folder


def _data(corpus, **fields) -> DataConfig:
    base = {"corpus": str(corpus), "directions": ["en-de"], "seed_per_direction": 10}
    return config_from_dict(DataConfig, {**base, **fields})


def test_training_pairs_are_a_seeded_random_sample_in_corpus_order(tmp_path):
    corpus = _corpus(tmp_path / "c")
    config = _data(corpus, train_per_direction=20)
    train = load_splits(config, ("train",)).train["en-de"]
    numbers = [int(e.reference[1:]) for e in train]
    assert len(train) == 20 and numbers == sorted(numbers) and numbers != list(range(20))
    assert load_splits(config, ("train",)).train["en-de"] == train
    other = load_splits(replace(config, seed=1), ("train",)).train["en-de"]
    assert other != train and len(other) == 20
    first = load_splits(replace(config, sample="first"), ("train",)).train["en-de"]
    assert [e.reference for e in first] == [f"T{i}" for i in range(20)]


def test_first_n_stops_reading_and_filters_come_before_sampling(tmp_path):
    corpus = _corpus(tmp_path / "c")
    with (corpus / "train.en-de.tsv").open("a", encoding="utf-8") as file:
        file.write("a line without a tab\n")
    first = load_splits(_data(corpus, train_per_direction=5, sample="first"), ("train",))
    assert len(first.train["en-de"]) == 5  # the malformed last line is never read
    with pytest.raises(MlasLoraError, match=r"train\.en-de\.tsv, line 201"):
        load_splits(_data(corpus, train_per_direction=5), ("train",))  # random reads it all
    _tsv(corpus, "test.en-de.tsv", [(_sentence(i, 2 if i % 2 else 5), f"E{i}") for i in range(100)])
    test = load_splits(_data(corpus, test_per_direction=30), ("test",)).test["en-de"]
    assert len(test) == 30 and all(len(e.source.split()) >= 4 for e in test)


def test_valid_is_carved_from_dev_disjoint_from_seeds_and_test(tmp_path):
    corpus = _corpus(tmp_path / "c")
    config = _data(corpus, valid_per_direction=12)
    splits = load_splits(config)
    seeds, valid, test = splits.dev["en-de"], splits.valid["en-de"], splits.test["en-de"]
    assert len(seeds) == 10 and len(valid) == 12
    assert not {e.source for e in valid} & {e.source for e in seeds}
    assert not {e.source for e in valid} & {e.source for e in test}
    assert all(e.reference.startswith("D") and len(e.source.split()) >= 4 for e in valid)
    assert load_splits(config).valid == splits.valid  # deterministic
    assert load_splits(config, ("valid",)).valid == splits.valid  # with or without dev requested
    assert load_splits(replace(config, seed=3)).valid != splits.valid
    without = load_splits(replace(config, valid_per_direction=0))
    assert without.dev == splits.dev and without.valid == {}  # the seeds do not depend on valid


def test_test_corpus_apart_from_the_training_corpus(tmp_path):
    train_corpus = _corpus(tmp_path / "wmt")
    _tsv(tmp_path / "flores", "devtest.en-de.tsv", [(_sentence(i), f"F{i}") for i in range(7)])
    config = _data(
        train_corpus, test_corpus=str(tmp_path / "flores"), test_split="devtest", valid_per_direction=3
    )
    splits = load_splits(config)
    assert [e.reference for e in splits.test["en-de"]] == [f"F{i}" for i in range(7)]
    assert splits.train["en-de"][0].reference == "T0" and len(splits.train["en-de"]) == 200
    assert all(e.reference.startswith("D") for e in splits.dev["en-de"] + splits.valid["en-de"])
    _tsv(tmp_path / "other", "test.en-de.tsv", [(_sentence(9), "O9")])
    plain = load_splits(replace(config, test_corpus=str(tmp_path / "other"), test_split="test"), ("test",))
    assert [e.reference for e in plain.test["en-de"]] == ["O9"]


def _embedded_corpus(home, n_dev=60):
    """A minimal embedded corpus (the layout `data build` writes) for German."""
    folder = home / "corpus" / "de"
    folder.mkdir(parents=True)
    rows = {
        "train": [(_sentence(i), f"T{i}") for i in range(30)],
        "dev": [(_sentence(i, 2 if i % 4 == 0 else 5), f"D{i}") for i in range(100, 100 + n_dev)],
        "test": [(_sentence(i), f"E{i}") for i in range(200, 220)],
    }
    for split, pairs in rows.items():
        lines = (json.dumps({"translation": {"en": en, "de": de}}) for en, de in pairs)
        (folder / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return rows


def test_embedded_seeds_unchanged_and_valid_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path))
    rows = _embedded_corpus(tmp_path)
    config = _data("embedded", directions=["en-de", "de-en"], seed_per_direction=8, valid_per_direction=10)
    splits = load_splits(config)
    # the seed rule before the valid split existed: 8 dev pairs of lowest seeded hash, in file order
    chosen = sorted(rows["dev"], key=lambda pair: unit_hash(pair[0], "subset-0"))[:8]
    golden = [pair for pair in rows["dev"] if pair in chosen]
    assert [(e.source, e.reference) for e in splits.dev["en-de"]] == golden
    seeds, valid = {e.source for e in splits.dev["en-de"]}, {e.source for e in splits.valid["en-de"]}
    assert len(valid) == 10 and not seeds & valid
    assert all(len(e.source.split()) >= 4 for e in splits.valid["en-de"])
    assert [e.reference for e in splits.valid["de-en"]] == [e.source for e in splits.valid["en-de"]]
    assert load_splits(config).valid == splits.valid


def test_new_data_settings_keep_keys_where_they_should():
    from mlas_lora.experiments.pipeline import train_key
    from mlas_lora.experiments.stages import SEED_DATA_FIELDS, seed_data_settings
    from mlas_lora.experiments.systems import resolve_system

    embedded = DataConfig(seed_per_direction=32)
    assert seed_data_settings(embedded) == {k: getattr(embedded, k) for k in SEED_DATA_FIELDS}
    assert seed_data_settings(replace(embedded, valid_per_direction=30)) == seed_data_settings(embedded)
    tsv = DataConfig(corpus="data/wmt")
    assert seed_data_settings(replace(tsv, sample="first")) != seed_data_settings(tsv)
    assert seed_data_settings(replace(tsv, seed=1)) != seed_data_settings(tsv)
    config = ExperimentConfig()
    evaluation_only = replace(
        config, data=replace(config.data, valid_per_direction=50, test_corpus="flores", test_split="devtest")
    )
    other_seed = replace(config, data=replace(config.data, seed=1))
    key = train_key(resolve_system("lora", config))
    assert key == train_key(resolve_system("lora", evaluation_only))
    assert key != train_key(resolve_system("lora", other_seed))


def test_bad_sampling_settings_are_config_problems():
    problems = DataConfig(sample="some", valid_per_direction=-1).problems()
    assert any("data.sample: 'some' (known: random, first)" in p for p in problems)
    assert any("data.valid_per_direction must be an int >= 0" in p for p in problems)


def test_a_test_split_filtered_to_nothing_is_an_error(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c")
    _tsv(corpus, "test.en-de.tsv", [(_sentence(i, 3), f"E{i}") for i in range(10)])
    with pytest.raises(MlasLoraError) as err:
        load_splits(_data(corpus), ("test",))
    assert f"the test split of en-de ({corpus / 'test.en-de.tsv'}) has no segment left" in str(err.value)
    assert "data.min_test_words=4" in str(err.value) and "lower data.min_test_words" in str(err.value)
    assert len(load_splits(_data(corpus, min_test_words=3), ("test",)).test["en-de"]) == 10
    assert load_splits(_data(corpus, test_per_direction=0), ("test",)).test["en-de"] == []
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    _embedded_corpus(tmp_path / "home")
    with pytest.raises(
        MlasLoraError, match=r"the test split of de-en \(embedded corpus\) has no segment left"
    ):
        load_splits(_data("embedded", directions=["de-en"], min_test_words=6), ("test",))
