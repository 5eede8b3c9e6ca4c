"""Awareness stage: Eq. (1) relevance, Eq. (2) neuron awareness, classification, files.

Eq. (1) and Eq. (2) are recomputed here independently of the hook machinery: Eq. (1) from
`output_hidden_states` (with the final norm removed so the last entry is the raw last-layer
output), Eq. (2) by running each sentence alone with full logits and `torch.autograd.grad` on
captured projection inputs and outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlas_lora.awareness.classify import (
    GENERAL_CLASS,
    auto_lambda,
    classification_lambda,
    classification_summary,
    classify_neurons,
    classify_scores,
    load_classes,
    resolve_lambda,
    save_classes,
)
from mlas_lora.awareness.layer_relevance import READINGS, select_layers
from mlas_lora.awareness.neuron_awareness import NeuronAwarenessTap, phi_key
from mlas_lora.awareness.scoring import (
    AwarenessScores,
    activation_gradients,
    load_awareness,
    pair_batches,
    recomputed_mlp_activation,
    recomputed_norms,
    save_awareness,
    score_teacher,
    scoring_mode,
    seed_target_loss,
)
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import PROJECTIONS, decoder_layers, projection
from mlas_lora.prompting import training_ids
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer

SEEDS = {
    "en-de": [
        Example("en", "de", "The cat sleeps.", "Die Katze schläft."),
        Example("en", "de", "We walked along the river until it was dark.", "Wir gingen am Fluss entlang."),
        Example("en", "de", "Hi", "Hallo"),
    ],
    "en-zh": [
        Example("en", "zh", "Good morning, teacher.", "老师早上好。"),
        Example("en", "zh", "It rains.", "下雨了。"),
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def teacher(family="qwen2"):
    return tiny_model(family, "teacher", num_hidden_layers=2)


def score(model, tokenizer, seeds=SEEDS, **kwargs):
    kwargs.setdefault("dtype", torch.float32)
    return score_teacher(model, tokenizer, seeds, progress=False, **kwargs)


def sentence_ids(tokenizer, example):
    prompt, target = training_ids(tokenizer, example)
    return torch.tensor([prompt + target]), len(prompt)


def source_positions(tokenizer, prompt: list[int], source: str) -> slice:
    """Where the source's ids sit in the prompt ids (last occurrence; the tiny tokenizer is byte-level)."""
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(prompt) - len(ids) + 1) if prompt[i : i + len(ids)] == ids]
    return slice(starts[-1], starts[-1] + len(ids))


def reference_relevance(model, tokenizer, seeds, reading="all"):
    """Eq. (1) per pair: mean over sentences of the mean over tokens of ||A_{i+1} - A_i||_1.

    `all` runs prompt + target; `prompt` and `source` run the prompt *alone* (no target) and average
    over all of its tokens or over the source segment's.
    """
    base = model.model
    norm, base.norm = base.norm, nn.Identity()
    rows = []
    with torch.no_grad():
        for examples in seeds.values():
            per_sentence = []
            for example in examples:
                prompt, target = training_ids(tokenizer, example)
                ids = prompt + target if reading == "all" else prompt
                where = (
                    source_positions(tokenizer, prompt, example.source)
                    if reading == "source"
                    else slice(None)
                )
                hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
                per_sentence.append(
                    [
                        (hidden[i + 1] - hidden[i])[0, where].abs().sum(-1).mean()
                        for i in range(len(hidden) - 1)
                    ]
                )
            rows.append(torch.tensor(per_sentence).mean(0))
    base.norm = norm
    return torch.stack(rows)


def reference_phi(model, tokenizer, examples):
    """Eq. (2) for one pair: sum over sentences and tokens of |dL/dh * h|, one sentence at a time."""
    totals = {}
    for example in examples:
        ids, prompt_len = sentence_ids(tokenizer, example)
        captured, handles = {}, []
        for index, layer in enumerate(decoder_layers(model)):
            for proj in PROJECTIONS:

                def keep(module, args, output, index=index, proj=proj, captured=captured):
                    captured[phi_key(index, proj, "in")] = args[0]
                    captured[phi_key(index, proj, "out")] = output

                handles.append(projection(layer, proj).register_forward_hook(keep))
        logits = model(ids).logits[0, :-1]
        for handle in handles:
            handle.remove()
        loss = F.cross_entropy(logits[prompt_len - 1 :], ids[0, prompt_len:])
        keys = list(captured)
        grads = torch.autograd.grad(loss, [captured[k] for k in keys])
        for key, grad in zip(keys, grads, strict=True):
            value = (grad * captured[key]).abs().sum(dim=(0, 1)).detach()
            totals[key] = totals.get(key, 0) + value
    return totals


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_relevance_and_phi_match_independent_computation(tokenizer, family):
    model = teacher(family)
    scores = score(model, tokenizer, batch_size=2)
    for reading in READINGS:
        torch.testing.assert_close(
            scores.relevance_by_reading[reading],
            reference_relevance(model, tokenizer, SEEDS, reading),
            rtol=1e-5,
            atol=1e-5,
        )
    assert scores.relevance_reading == "source"
    assert torch.equal(scores.relevance, scores.relevance_by_reading["source"])
    assert not torch.allclose(scores.relevance_by_reading["source"], scores.relevance_by_reading["all"])
    for pair_index, examples in enumerate(SEEDS.values()):
        expected = reference_phi(model, tokenizer, examples)
        assert set(expected) == set(scores.phi)
        for key, value in expected.items():
            torch.testing.assert_close(scores.phi[key][pair_index], value, rtol=1e-4, atol=1e-7, msg=key)


def test_shared_inputs_have_equal_scores(tokenizer):
    scores = score(teacher(), tokenizer)
    for layer in range(2):
        q, gate = scores.phi_of(layer, "q", "in"), scores.phi_of(layer, "gate", "in")
        assert torch.equal(q, scores.phi_of(layer, "k", "in")) and torch.equal(
            q, scores.phi_of(layer, "v", "in")
        )
        assert torch.equal(gate, scores.phi_of(layer, "up", "in"))
        assert not torch.equal(q, gate) and q.min() >= 0 and q.sum() > 0


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_down_input_is_rebuilt_not_held(tokenizer, family):
    model = teacher(family)
    layers = decoder_layers(model)
    tap = NeuronAwarenessTap(layers, 1)
    batch = pair_batches(tokenizer, SEEDS["en-de"], 3)[0]
    try:
        with activation_gradients(model):
            tap.start_batch(0, batch.tokens)
            loss = seed_target_loss(model, batch)
            held = set(tap._saved)
            loss.backward()
    finally:
        tap.remove()
    assert tap._recompute == {0: True, 1: True}
    assert "phi.0.down.in" not in held and {"phi.0.gate.out", "phi.0.up.out", "phi.1.q.in"} <= held
    assert "phi.1.k.in" not in held  # shared with q: held once
    assert tap._saved == {} and tap.buffers["phi.1.down.in"].sum() > 0


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_scoring_mode_recomputes_the_mlp_activation_instead_of_keeping_it(tokenizer, family):
    model = teacher(family)
    batch = pair_batches(tokenizer, SEEDS["en-de"], 3)[0]
    width = model.config.intermediate_size

    def saved_mlp_wide(context):
        """How many activations of the MLP's width autograd keeps for backward, and the input's gradient."""
        count = 0

        def pack(t):
            nonlocal count
            count += t.dim() == 3 and t.shape[-1] == width  # [batch, seq, width]; weights are 2-D
            return t

        with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_()
            out = model(inputs_embeds=hidden, attention_mask=batch.tokens.long()).logits.sum()
        out.backward()
        return count, hidden.grad

    plain_count, plain_grad = saved_mlp_wide(activation_gradients(model))
    with activation_gradients(model):
        light_count, light_grad = saved_mlp_wide(recomputed_mlp_activation(model))
    layers = len(decoder_layers(model))
    assert plain_count == 3 * layers and light_count == 2 * layers  # gate, up (and no longer act(gate))
    torch.testing.assert_close(light_grad, plain_grad, rtol=1e-5, atol=1e-6)
    with scoring_mode(model):  # + recomputed norms (checked without the counting hooks, which clash)
        hidden = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_()
        model(inputs_embeds=hidden, attention_mask=batch.tokens.long()).logits.sum().backward()
    torch.testing.assert_close(hidden.grad, plain_grad, rtol=1e-5, atol=1e-6)
    with recomputed_mlp_activation(model) as mlps, recomputed_norms(model) as norms:
        assert mlps == layers and norms >= 2 * layers
    assert all("forward" not in vars(m) for m in model.modules())


def test_padding_and_batching_do_not_change_scores(tokenizer):
    seeds = {"en-de": SEEDS["en-de"]}
    model = teacher()
    alone = score(model, tokenizer, seeds, batch_size=1)
    batched = score(model, tokenizer, seeds, batch_size=3)
    torch.testing.assert_close(batched.relevance, alone.relevance, rtol=1e-5, atol=1e-6)
    for key in alone.phi:
        torch.testing.assert_close(batched.phi[key], alone.phi[key], rtol=1e-4, atol=1e-7, msg=key)


def test_scoring_leaves_weights_without_grad_and_restores_model(tokenizer):
    model = teacher().train()
    model.lm_head.weight.requires_grad_(True)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    score(model, tokenizer)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []


def test_bfloat16_scores_are_float32_and_close_to_float32_run(tokenizer):
    exact = score(teacher(), tokenizer)
    half = score(teacher(), tokenizer, dtype=torch.bfloat16)
    assert half.dtype == "bfloat16" and exact.dtype == "float32"
    assert half.relevance.dtype == torch.float32 and half.phi["phi.1.down.in"].dtype == torch.float32
    torch.testing.assert_close(half.relevance, exact.relevance, rtol=3e-2, atol=0)
    for key in ("phi.0.q.in", "phi.1.down.out", "phi.1.gate.out"):
        a, b = half.phi[key].flatten(), exact.phi[key].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.98, key


def test_select_layers_keeps_top_l_in_original_order():
    relevance = torch.tensor([[1.0, 5.0, 3.0, 4.0], [3.0, 1.0, 3.0, 0.0]])  # mean [2, 3, 3, 2]
    assert select_layers(relevance, 2) == [1, 2]
    assert select_layers(relevance, 3) == [0, 1, 2]  # tie between layers 0 and 3 goes to 0
    assert select_layers(relevance, 4) == [0, 1, 2, 3]
    assert select_layers(relevance, 2, mode="pair", pair=0) == [1, 3]
    assert select_layers(relevance, 2, mode="pair", pair="en-zh", pairs=["en-de", "en-zh"]) == [0, 2]
    for bad in (
        dict(num_layers=5),
        dict(num_layers=0),
        dict(num_layers=2, mode="max"),
        dict(num_layers=2, mode="pair"),
    ):
        with pytest.raises(MlasLoraError):
            select_layers(relevance, **bad)


def test_score_teacher_selects_by_mean_relevance(tokenizer):
    model = tiny_model("llama", "teacher")  # 4 layers
    scores = score(model, tokenizer, num_student_layers=2)
    assert scores.selected_layers == select_layers(scores.relevance, 2)
    assert scores.with_selection(3, "pair", "en-zh").selected_layers == select_layers(scores.relevance[1:], 3)
    assert score(model, tokenizer, {"en-de": SEEDS["en-de"][:1]}).selected_layers == [0, 1, 2, 3]


PHI = torch.tensor(
    [  # 5 pairs x 5 neurons; column shares: all 0, all 0.2, max 0.6, max 0.75, max 3/11
        [0.0, 1.0, 1.0, 0.0, 2.0],
        [0.0, 1.0, 1.0, 3.0, 2.0],
        [0.0, 1.0, 1.0, 1.0, 2.0],
        [0.0, 1.0, 1.0, 0.0, 2.0],
        [0.0, 1.0, 6.0, 0.0, 3.0],
    ]
)


@pytest.mark.parametrize(
    "lam, expected",
    [(0.2, [-1, -1, 4, 1, 4]), (0.6, [-1, -1, -1, 1, -1]), (0.1, [-1, 0, 4, 1, 4]), (0.75, [-1] * 5)],
)
def test_classify_scores_exact(lam, expected):
    assert classify_scores(PHI, lam).tolist() == expected


def hand_made_scores() -> AwarenessScores:
    pairs = ["en-cs", "en-de", "en-et", "en-fi", "en-ru"]
    phi = {phi_key(0, "q", "in"): PHI, phi_key(1, "down", "out"): PHI[:, 2:]}
    return AwarenessScores(pairs, torch.ones(5, 2), phi, {p: 1 for p in pairs}, "float32", [0, 1])


def test_classify_neurons_masks_and_summary():
    classes = classify_neurons(hand_made_scores(), lam=0.2)
    assert classes.of(0, "q", "in").tolist() == [-1, -1, 4, 1, 4]
    assert classes.of(1, "down", "out").tolist() == [4, 1, 4]
    summary = classes.summary
    assert summary["total"] == {
        "general": 2,
        "specific": {"en-cs": 0, "en-de": 2, "en-et": 0, "en-fi": 0, "en-ru": 4},
    }
    assert summary["per_layer"]["0"]["general"] == 2 and summary["per_layer"]["1"]["general"] == 0
    assert summary["per_projection"]["down"]["specific"]["en-ru"] == 2
    assert summary["per_projection"]["k"] == {"general": 0, "specific": dict.fromkeys(classes.pairs, 0)}
    table = classification_summary(classes).splitlines()
    assert table[0] == "lambda = 0.2, normalize = none"
    assert table[-1].split() == ["total", "2", "6", "0", "2", "0", "0", "4"]
    assert classify_neurons(hand_made_scores(), lam=0.6).summary["total"]["general"] == 6
    with pytest.raises(MlasLoraError):
        classify_neurons(hand_made_scores(), lam=1.5)


def test_files_round_trip(tokenizer, tmp_path):
    scores = score(teacher(), tokenizer, num_student_layers=1)
    save_awareness(scores, tmp_path)
    meta = json.loads((tmp_path / "awareness.json").read_text())
    assert meta["pairs"] == ["en-de", "en-zh"] and meta["num_teacher_layers"] == 2
    assert meta["num_sentences"] == {"en-de": 3, "en-zh": 2} and meta["selection_mode"] == "mean"
    assert len(meta["selected_layers"]) == 1 and meta["dtype"] == "float32" and meta["reduction"]
    loaded = load_awareness(tmp_path)
    assert (
        torch.equal(loaded.relevance, scores.relevance) and loaded.selected_layers == scores.selected_layers
    )
    assert loaded.phi.keys() == scores.phi.keys() and all(
        torch.equal(loaded.phi[k], v) for k, v in scores.phi.items()
    )
    assert loaded.phi["phi.1.gate.out"].shape == (2, 128) and loaded.phi["phi.1.down.in"].shape == (2, 128)
    classes = classify_neurons(loaded)
    save_classes(classes, tmp_path)
    again = load_classes(tmp_path)
    assert again.lam == 0.2 and again.pairs == classes.pairs and again.summary == classes.summary
    assert all(
        torch.equal(again.classes[k], v) and v.dtype == torch.int64 for k, v in classes.classes.items()
    )


def test_bad_inputs_raise_clear_errors(tokenizer, tmp_path):
    with pytest.raises(MlasLoraError, match="no seed sentences"):
        score(teacher(), tokenizer, {"en-de": []})
    with pytest.raises(MlasLoraError, match="other directions: en-zh"):
        score(teacher(), tokenizer, {"en-de": SEEDS["en-zh"]})
    with pytest.raises(MlasLoraError, match=r"missing .*awareness.* \(run the awareness stage first\)"):
        load_awareness(tmp_path)
    save_awareness(hand_made_scores(), tmp_path)
    with pytest.raises(MlasLoraError, match="phi keys do not match"):
        load_awareness(tmp_path)


@pytest.mark.slow
def test_embedded_teacher_scores_every_layer(tmp_path):
    from mlas_lora.models.loading import load_model
    from mlas_lora.models.registry import is_prepared

    if not is_prepared("qwen2.5-coder-1.5b-instruct"):
        pytest.skip("embedded teacher not prepared (mlas-lora models prepare qwen2.5-coder-1.5b-instruct)")
    model, tokenizer = load_model("qwen2.5-coder-1.5b-instruct", dtype="bfloat16")
    seeds = {pair: examples[:2] for pair, examples in SEEDS.items()}
    scores = score_teacher(model, tokenizer, seeds, batch_size=2, num_student_layers=24, progress=False)
    assert scores.relevance.shape == (2, 28) and len(scores.selected_layers) == 24
    assert scores.phi_of(27, "down", "in").shape == (2, 8960) and scores.phi_of(0, "k", "out").shape == (
        2,
        256,
    )
    assert all(torch.isfinite(v).all() and v.sum() > 0 for v in scores.phi.values())
    assert torch.equal(scores.phi_of(5, "q", "in"), scores.phi_of(5, "v", "in"))
    assert all(p.grad is None for p in model.parameters())
    save_awareness(scores, tmp_path)
    assert load_awareness(tmp_path).selected_layers == scores.selected_layers


@pytest.mark.parametrize("pairs, expected", [(14, 0.2), (4, 0.35385), (2, 0.56923), (1, 1.0)])
def test_auto_lambda_keeps_the_papers_distance_from_uniform(pairs, expected):
    assert auto_lambda(pairs) == pytest.approx(expected, abs=1e-5)
    assert resolve_lambda("auto", pairs) == pytest.approx(expected, abs=1e-5)


def test_auto_lambda_at_four_pairs_allows_general_neurons():
    """0.2 with 4 pairs makes every neuron specific; auto leaves the near-uniform ones general."""
    phi = torch.tensor([[1.0, 4.0], [1.1, 0.1], [0.9, 0.1], [1.0, 0.1]])  # near-uniform, then peaked
    assert classify_scores(phi, 0.2).tolist() == [1, 0]
    assert classify_scores(phi, resolve_lambda("auto", 4)).tolist() == [GENERAL_CLASS, 0]


def test_every_lambda_below_one_over_p_classifies_as_zero():
    """max share >= 1/P, so below 1/P lambda cannot matter: the stages key and classify it as one."""
    phi = torch.rand(4, 5000, generator=torch.Generator().manual_seed(0)) ** 4
    phi[:, :3] = 1.0  # exactly uniform shares
    phi[:, 3] = 0.0  # never scored: general at every lambda
    zero = classify_scores(phi, 0.0)
    for lam in (0.05, 0.129, 0.207, 0.25 - 2e-9):
        assert torch.equal(classify_scores(phi, lam), zero)
        assert classification_lambda(lam, 4) == 0.2  # the paper's value represents them (keys kept)
    assert classification_lambda(0.1, 5) == 0.0 and classification_lambda(0.2, 5) == 0.2  # 1/5 = 0.2
    assert zero[3] == GENERAL_CLASS and (zero[:3] == 0).all()
    assert classification_lambda(0.25, 4) == 0.25 and classification_lambda(0.286, 4) == 0.286
    assert not torch.equal(classify_scores(phi, 0.25), zero)  # the uniform ones become general
    assert classification_lambda(0.2, 14) == 0.2  # the paper's setting is untouched


def test_resolve_lambda_rejects_other_strings():
    with pytest.raises(MlasLoraError, match="'auto'"):
        resolve_lambda("half", 4)
