"""LSLo (methods/lslo.py, adapters/language_lora.py): source-routed lower layers, target-routed upper
layers, per-sample routing in mixed batches, gradual cubic pruning that stays pruned, exact resume,
one PEFT adapter per pair, the official README's defaults, and a rank matched to MLAS-LoRA's on
request."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from mlas_lora.adapters.language_lora import LanguageLoRAConfig, attach_language_lora, cubic_sparsity
from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.config import config_from_dict
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods import Student
from mlas_lora.methods.base import count_trainable
from mlas_lora.methods.lslo import OFFICIAL_TARGETS, Lslo, export_pair_adapters, lslo_config, matched_rank
from mlas_lora.models.arch import PROJECTIONS, ArchInfo, describe
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ("en-de", "en-fi", "fi-de")
"""Sources en, fi; targets de, fi: two pairs share a source, two share a target."""
TEXTS = ["open file 3", "open file 3", "open file 3"]


def lslo(split=2, layers=4, sparsity=0.0, start=0.0, end=1.0, seed=0):
    """A 4-layer tiny model with LSLo; every B random so that every language's LoRA acts."""
    model = tiny_model(seed=seed, num_hidden_layers=layers)
    torch.manual_seed(seed)
    config = LanguageLoRAConfig(PAIRS, split, 4, 2.0, sparsity=sparsity, prune_start=start, prune_end=end)
    lslo = attach_language_lora(model, config)
    with torch.no_grad():
        for block in lslo.factors():
            block.B.normal_(0.0, 0.1)
    return lslo


def run(model, pairs, **kwargs):
    encoded = tiny_tokenizer()(TEXTS[: len(pairs)], return_tensors="pt", padding=True)
    with torch.no_grad(), model.routing(list(pairs)):
        return model(**encoded, **kwargs)


def test_each_side_has_a_lora_per_language_of_that_side():
    model = lslo(split=1)
    layers = model.lslo_layers()
    assert list(layers[(0, "q")].loras) == ["en", "fi"]  # sources
    assert list(layers[(1, "q")].loras) == ["de", "fi"] == list(layers[(3, "down")].loras)  # targets
    config = LanguageLoRAConfig(("en-cs", "en-de", "en-et", "en-fi"), 12, 16, 2.0)
    assert config.sources == ("en",) and config.target_languages == ("cs", "de", "et", "fi")


def test_below_the_split_the_update_ignores_the_target():
    """en-de and en-fi share the source: identical hidden states entering the split layer, not after."""
    out = run(lslo(split=2), ["en-de", "en-fi"], output_hidden_states=True)
    entering = out.hidden_states[2]  # hidden_states[i] is the input of layer i
    torch.testing.assert_close(entering[0], entering[1], rtol=0, atol=1e-6)
    assert (out.hidden_states[3][0] - out.hidden_states[3][1]).abs().max() > 1e-3
    other_source = run(lslo(split=2), ["en-de", "fi-de"], output_hidden_states=True).hidden_states[2]
    assert (other_source[0] - other_source[1]).abs().max() > 1e-3


def test_each_projection_reads_only_its_sides_language():
    """Same input, rows routed en-de / en-fi / fi-de: equal where the side's language is equal."""
    model = lslo(split=2)
    for (i, proj), layer in model.lslo_layers().items():
        torch.manual_seed(i)
        x = torch.randn(1, 5, layer.base.in_features).expand(3, 5, -1)
        with torch.no_grad(), model.routing(list(PAIRS)):
            y = layer(x)
        same, other = ((0, 1), (0, 2)) if i < 2 else ((0, 2), (0, 1))
        torch.testing.assert_close(y[same[0]], y[same[1]], rtol=0, atol=1e-6, msg=f"{i} {proj}")
        assert (y[other[0]] - y[other[1]]).abs().max() > 1e-4, (i, proj)
        b, a = model.pair_update("en-de")[(i, proj)]
        twin = "en-fi" if i < 2 else "fi-de"
        assert torch.equal(b, model.pair_update(twin)[(i, proj)][0]) and torch.equal(
            a, model.pair_update(twin)[(i, proj)][1]
        )


def test_a_mixed_batch_gives_each_row_its_own_pairs_output():
    model = lslo()
    mixed = run(model, list(PAIRS)).logits
    for row, pair in enumerate(PAIRS):
        alone = run(model, [pair]).logits[0]
        torch.testing.assert_close(mixed[row], alone, rtol=0, atol=1e-5)


def test_a_pair_without_a_lora_on_one_side_is_refused():
    with pytest.raises(MlasLoraError):
        run(lslo(), ["de-en"])  # de has no source LoRA, en no target LoRA


def test_the_sparsity_follows_the_cubic_schedule():
    expected = {0.0: 0.0, 0.2: 0.0, 0.3: 0.8 * (1 - 0.75**3), 0.4: 0.8 * (1 - 0.5**3), 0.6: 0.8, 1.0: 0.8}
    for fraction, sparsity in expected.items():
        assert cubic_sparsity(fraction, 0.8, 0.2, 0.6) == pytest.approx(sparsity, abs=1e-12)
    config = LanguageLoRAConfig(PAIRS, 2, 4, 2.0, sparsity=0.8, prune_start=0.2, prune_end=0.6)
    assert [round(config.sparsity_at(s, 10), 6) for s in (2, 3, 4, 6, 10)] == [0.0, 0.4625, 0.7, 0.8, 0.8]


def test_pruning_removes_the_smallest_weights_of_each_matrix_and_never_restores_one():
    model = lslo()
    block = model.lslo_layers()[(0, "q")].loras["en"]
    a = block.A.detach().clone()
    model.prune(0.5)
    first = block.mask_A.clone()
    assert int((~first).sum()) == a.numel() // 2
    assert a.abs()[~first].max() <= a.abs()[first].min()  # magnitude pruning
    assert all(int((~m).sum()) == m.numel() // 2 for b in model.factors() for m in (b.mask_A, b.mask_B))
    with torch.no_grad():
        block.A.copy_(a)  # the pruned weights come back large: they must stay pruned
    model.prune(0.75)
    assert not (block.mask_A & ~first).any() and int((~block.mask_A).sum()) == (3 * a.numel()) // 4
    assert torch.all(block.A[~block.mask_A] == 0)
    model.prune(0.5)  # a lower sparsity never unprunes
    assert int((~block.mask_A).sum()) == (3 * a.numel()) // 4


def test_decoding_sees_every_prune_and_load():
    """The no-grad factor cache follows the weights and masks (version counters)."""
    model = lslo()
    before = run(model, list(PAIRS)).logits
    model.prune(0.5)
    pruned = run(model, list(PAIRS)).logits
    encoded = tiny_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with model.routing(list(PAIRS)):
        uncached = model(**encoded).logits.detach()  # grad enabled: no cache
    assert (before - pruned).abs().max() > 1e-3 and torch.equal(pruned, uncached)


EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)]
EXAMPLES += [Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(8)]
EXAMPLES += [Example("fi", "de", f"kissa {i}", f"Katze {i}") for i in range(8)]


def train(out_dir, steps, stop_after=None, inspect=None):
    model = lslo(sparsity=0.8, start=0.2, end=0.6)
    student, method = Student(model, tiny_tokenizer()), Lslo()

    def after_step(step, total):
        if inspect is not None:
            inspect(model, step, before=True)
        method.after_step(student, step, total)
        if inspect is not None:
            inspect(model, step, before=False)

    config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=1, max_steps=steps, checkpoint_every=1)
    trainer = Trainer(
        model, student.tokenizer, EXAMPLES, list(PAIRS), config, out_dir, model.routing,
        lambda path: method.save(student, path), lambda path: method.load(student, path),
        after_step=after_step,
    )  # fmt: skip
    trainer.fit(progress=False, stop_after=stop_after)
    return model


def test_pruned_weights_stay_zero_after_later_steps_and_the_schedule_is_kept(tmp_path):
    seen, moved = {}, []

    def inspect(model, step, before):
        masks = {k: v.clone() for k, v in model.lslo_state_dict().items() if ".mask_" in k}
        weights = model.lslo_state_dict()
        if before:  # AdamW's momentum moves weights pruned earlier: after_step must zero them again
            moved.extend(
                k
                for k, m in seen.get(step - 1, {}).items()
                if weights[k.replace("mask_", "")][~m].abs().sum() > 0
            )
            return
        for key, mask in masks.items():
            assert torch.all(weights[key.replace("mask_", "")][~mask] == 0), (step, key)
            assert int((~mask).sum()) == int(model.lslo_config.sparsity_at(step, 5) * mask.numel() + 1e-9)
            if step - 1 in seen:
                assert not (mask & ~seen[step - 1][key]).any(), (step, key)  # pruned ones stay pruned
        seen[step] = masks

    model = train(tmp_path, 5, inspect=inspect)
    assert sorted(seen) == [1, 2, 3, 4, 5] and moved, "the optimizer never moved a pruned weight"
    assert model.sparsity() == pytest.approx(0.8, abs=0.01)


def test_resume_with_pruning_ends_with_the_same_factors_and_masks(tmp_path):
    straight = train(tmp_path / "a", 4).lslo_state_dict()
    train(tmp_path / "b", 4, stop_after=2)
    resumed = train(tmp_path / "b", 4).lslo_state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not m.all() for k, m in straight.items() if ".mask_" in k)


def test_each_pairs_peft_adapter_gives_the_routed_logits(tmp_path):
    model = lslo(split=2)
    model.prune(0.5)
    base_path = tmp_path / "base"
    tiny_model(seed=0, num_hidden_layers=4).save_pretrained(base_path)
    folders = export_pair_adapters(model, tmp_path / "adapters", str(base_path))
    encoded = tiny_tokenizer()(["open file 3", "save the table now"], return_tensors="pt", padding=True)
    for pair, folder in folders.items():
        peft = PeftModel.from_pretrained(tiny_model(seed=0, num_hidden_layers=4), str(folder)).eval()
        with torch.no_grad(), model.routing([pair, pair]):
            ours = model(**encoded).logits
        with torch.no_grad():
            torch.testing.assert_close(peft(**encoded).logits, ours, rtol=0, atol=1e-5)


QWEN = ArchInfo("qwen2", 24, 896, 4864, 14, 2, 64)
"""Qwen2.5-0.5B: 24 layers, hidden 896, intermediate 4864, 14 heads, 2 kv heads, head dim 64."""


def test_the_defaults_are_the_official_readmes():
    config = config_from_dict(ExperimentConfig, {"lora": {"r_gen": 4, "r_spe": 4}})
    shape = lslo_config(config, ["en-cs", "en-de", "en-et", "en-fi"], QWEN)
    assert (shape.split, shape.rank, shape.targets) == (9, 2, ("q", "k", "v", "gate", "up", "down"))
    assert (shape.sparsity, shape.prune_start, shape.prune_end) == (0.9, 2 / 15, 10 / 15)
    assert Lslo().training_config(config).lr == 3e-3 != config.training.lr
    assert Lslo().train_key(config, {})["training"]["lr"] == 3e-3
    per_rank = sum(sum(QWEN.projection_shape(p)) for p in shape.targets)
    assert per_rank == (896 + 896) + 2 * (896 + 128) + 3 * (896 + 4864) == 21_120
    assert per_rank * 2 * (9 * 1 + 15 * 4) == 2_914_560  # 9 layers x en, 15 x cs de et fi
    pairs, tiny = ["en-de", "en-fi"], tiny_model()
    model = attach_language_lora(tiny, lslo_config(config, pairs, describe(tiny)))
    assert model.lslo_config.split == 1  # round(2 x 9 / 24)
    assert {proj for _, proj in model.lslo_layers()} == {"q", "k", "v", "gate", "up", "down"}  # no o
    # 2 x (q 64 + k 48 + v 48 + gate 96 + up 96 + down 96) x (1 layer x en + 1 layer x de, fi)
    assert count_trainable(model) == 2 * 448 * 3 == 2_688
    config.options = {"lr": 1e-4, "rank": 8}
    assert Lslo().training_config(config).lr == 1e-4  # an lr grid sets options.lr
    assert lslo_config(config, pairs, describe(tiny)).rank == 8  # the low-resource rank


def test_the_matched_rank_gives_mlas_loras_parameter_count():
    config = config_from_dict(
        ExperimentConfig,
        {"lora": {"r_gen": 4, "r_spe": 4}, "options": {"rank": "matched", "targets": list(PROJECTIONS)}},
    )
    pairs, tiny = ["en-de", "en-fi"], tiny_model()
    shape = lslo_config(config, pairs, describe(tiny))
    assert (shape.split, shape.rank, shape.scaling) == (1, 8, 4.0)  # 2 (4 + 2 x 4) / (1 + 2) = 8
    ours = count_trainable(attach_language_lora(tiny, shape))
    mlas = count_trainable(attach_routed_lora(tiny_model(), pairs, r_gen=4, r_spe=4))
    assert ours == mlas == 12_288
    # the first version's row: Qwen2.5-0.5B, 4 en-xx pairs, r_gen = r_spe = 8, split 12, every projection
    lora = config_from_dict(ExperimentConfig, {}).lora
    assert matched_rank(QWEN, 12, 1, 4, PROJECTIONS, lora, 4) == 16
    per_rank = sum(sum(QWEN.projection_shape(p)) for p in PROJECTIONS)
    assert per_rank * 16 * (12 * 1 + 12 * 4) == per_rank * 24 * (8 + 4 * 8) == 21_995_520
    assert matched_rank(QWEN, 9, 1, 4, OFFICIAL_TARGETS, lora, 4) == 15  # 21,995,520 / (69 x 21,120)


def test_bad_options_are_reported():
    config = config_from_dict(
        ExperimentConfig, {"options": {"sparsity": 1.5, "prune_start": 0.8, "prune_end": 0.2}}
    )
    (problem,) = Lslo().problems(config)
    assert "sparsity" in problem and "prune_start" in problem
    assert Lslo().problems(config_from_dict(ExperimentConfig, {"options": {"typo": 1}}))
    assert Lslo().problems(config_from_dict(ExperimentConfig, {"options": {"split": 3, "rank": 4}})) == []
    bad = {"options": {"rank": "half", "targets": ["q", "fc1"], "lr": 0}}
    (problem,) = Lslo().problems(config_from_dict(ExperimentConfig, bad))
    assert "options.rank" in problem and "fc1" in problem and "options.lr" in problem
