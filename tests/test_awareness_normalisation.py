"""Per-pair normalisation before classification, the neuron counts, token counts and max_tokens."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mlas_lora.awareness.classify import (
    NEURON_DEFINITION,
    classify_neurons,
    normalize_phi,
    save_classes,
)
from mlas_lora.awareness.neuron_awareness import phi_key
from mlas_lora.awareness.scoring import pair_batches, save_awareness, score_teacher, seed_ids
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS
from mlas_lora.prompting import training_ids
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.transfer.transfer import AwarenessInputs

SEEDS = {
    "en-de": [
        Example("en", "de", "The cat sleeps.", "Die Katze schläft."),
        Example("en", "de", "We walked along the river until it was dark.", "Wir gingen am Fluss entlang."),
        Example("en", "de", "Hi", "Hallo"),
    ],
    "en-et": [
        Example(
            "en", "et", "Good morning, teacher, how are you today?", "Tere hommikust, õpetaja, kuidas läheb?"
        ),
        Example("en", "et", "It rains.", "Sajab vihma."),
    ],
    "en-fi": [
        Example("en", "fi", "Open the file.", "Avaa tiedosto."),
        Example(
            "en", "fi", "Save all documents before closing.", "Tallenna kaikki asiakirjat ennen sulkemista."
        ),
    ],
}
LAM = 0.45  # between 1/3 and 1 for 3 pairs: both classes occur

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", "teacher", num_hidden_layers=3)


def score(model, tokenizer, seeds=SEEDS, **kwargs):
    return score_teacher(model, tokenizer, seeds, dtype=torch.float32, progress=False, **kwargs)


def same_classes(a, b) -> bool:
    return a.classes.keys() == b.classes.keys() and all(
        torch.equal(a.classes[k], b.classes[k]) for k in a.classes
    )


def test_token_counts_are_recorded(model, tokenizer):
    scores = score(model, tokenizer)
    for pair, examples in SEEDS.items():
        ids = [training_ids(tokenizer, e) for e in examples]
        assert scores.num_tokens[pair] == sum(len(p) + len(t) for p, t in ids)
        assert scores.num_target_tokens[pair] == sum(len(t) for _, t in ids)


def test_duplicated_seed_set_leaves_token_normalised_classes_unchanged(model, tokenizer):
    """A pair with twice the seed tokens must not own more neurons (it does with raw sums)."""
    doubled = {**SEEDS, "en-et": SEEDS["en-et"] * 2}
    once, twice = score(model, tokenizer), score(model, tokenizer, doubled)
    assert twice.num_tokens["en-et"] == 2 * once.num_tokens["en-et"]
    for normalize in ("tokens", "total"):
        assert same_classes(
            classify_neurons(once, LAM, normalize), classify_neurons(twice, LAM, normalize)
        ), normalize
    raw_once, raw_twice = classify_neurons(once, LAM, "none"), classify_neurons(twice, LAM, "none")
    assert not same_classes(raw_once, raw_twice)  # the bias the normalisation removes
    assert raw_twice.summary["total"]["specific"]["en-et"] > raw_once.summary["total"]["specific"]["en-et"]


def test_a_constant_factor_on_one_pairs_loss_leaves_total_normalised_classes_unchanged(model, tokenizer):
    """Scaling a pair's loss by c scales its activation gradients, hence its Phi, by c."""
    scores = score(model, tokenizer)
    factor = torch.tensor([[1.0], [7.0], [1.0]])
    louder = replace(scores, phi={k: v * factor for k, v in scores.phi.items()})
    assert same_classes(classify_neurons(scores, LAM, "total"), classify_neurons(louder, LAM, "total"))
    assert not same_classes(classify_neurons(scores, LAM, "tokens"), classify_neurons(louder, LAM, "tokens"))


def test_normalize_phi_exact():
    phi = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    assert normalize_phi(phi, "tokens", torch.tensor([2.0, 4.0])).tolist() == [[0.5, 1.5], [0.5, 0.5]]
    assert normalize_phi(phi, "total").tolist() == [[0.25, 0.75], [0.5, 0.5]]
    assert normalize_phi(torch.zeros(2, 2), "total").tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(MlasLoraError, match="normalize"):
        normalize_phi(phi, "softmax")


def test_tokens_normalisation_needs_token_counts(model, tokenizer):
    scores = replace(score(model, tokenizer), num_tokens={})
    with pytest.raises(MlasLoraError, match="re-run the awareness stage"):
        classify_neurons(scores, LAM, "tokens")


def test_counts_cover_the_selected_layers_and_each_neuron_once(model, tokenizer):
    scores = score(model, tokenizer, num_student_layers=2)
    (layer_kept, layer_kept_2), all_layers = scores.selected_layers, range(3)
    dropped = next(i for i in all_layers if i not in scores.selected_layers)
    summary = classify_neurons(scores, LAM, "tokens").summary
    shared = {("k", "in"), ("v", "in"), ("up", "in")}
    expected = sum(
        scores.phi[phi_key(layer, proj, side)].shape[1]
        for layer in (layer_kept, layer_kept_2)
        for proj in PROJECTIONS
        for side in ("in", "out")
        if (proj, side) not in shared
    )
    total = summary["total"]
    assert total["general"] + sum(total["specific"].values()) == expected
    assert (
        set(summary["per_layer"]) == {str(layer_kept), str(layer_kept_2)}
        and str(dropped) not in summary["per_layer"]
    )
    hidden = model.config.hidden_size
    per_proj = summary["per_projection"]
    assert sum(per_proj["k"]["specific"].values()) + per_proj["k"][
        "general"
    ] == 2 * model.config.num_key_value_heads * (
        hidden // model.config.num_attention_heads
    )  # k's outputs only: its input is counted under q
    assert summary["neuron"] == NEURON_DEFINITION


def test_max_tokens_cuts_seeds_as_training_does(model, tokenizer):
    budget = 40
    for example in SEEDS["en-et"]:
        ids = seed_ids(tokenizer, example, budget)
        assert len(ids.prompt) + len(ids.target) <= budget
        start, end = ids.source_span
        assert 0 <= start < end <= len(ids.prompt)
    batch = pair_batches(tokenizer, SEEDS["en-et"], 2, max_tokens=budget)[0]
    assert batch.input_ids.shape[1] <= budget
    short, full = score(model, tokenizer, max_tokens=budget), score(model, tokenizer)
    assert short.num_tokens["en-et"] < full.num_tokens["en-et"]
    assert all(n <= budget * len(SEEDS[p]) for p, n in short.num_tokens.items())


def test_source_span_marks_the_source_text(tokenizer):
    example = SEEDS["en-de"][1]
    ids = seed_ids(tokenizer, example)
    start, end = ids.source_span
    assert tokenizer.decode(ids.prompt[start:end]) == example.source


def test_transfer_ranks_with_the_classes_normalisation(model, tokenizer, tmp_path):
    scores = score(model, tokenizer, num_student_layers=2)
    save_awareness(scores, tmp_path / "awareness")
    save_classes(classify_neurons(scores, LAM, "tokens"), tmp_path / "classes")
    phi, _ = AwarenessInputs(tmp_path / "awareness", tmp_path / "classes").side(0, "gate", "out")
    tokens = torch.tensor([float(scores.num_tokens[p]) for p in scores.pairs])
    torch.testing.assert_close(phi, scores.phi_of(0, "gate", "out") / tokens[:, None])
    meta = json.loads((tmp_path / "classes" / "classes.json").read_text())
    assert meta["normalize"] == "tokens"
