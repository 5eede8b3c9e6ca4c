"""Tests that catch wrong results: each one fails on a plausible one-line bug that the rest of the
suite let through (issue 22, item 7).

- the gathered path of the routed LoRA layer (more than DENSE_MAX_PAIRS pairs in a batch) against
  Eq. (9) written out per row;
- the trainer routes each row to its own pair: an absent pair keeps `grad is None` and its weights,
  and the step's loss is the loss of a hand-routed forward;
- a resume starts after the newest checkpoint and runs only the remaining steps;
- the scores an experiment writes are sacreBLEU's on the hypotheses and references it saved.
"""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch
from torch import nn

from mlas_lora.adapters import routed_lora
from mlas_lora.adapters.export import load_routed, save_routed
from mlas_lora.adapters.routed_lora import RoutedLoRAConfig, RoutedLoRALinear, Router, attach_routed_lora
from mlas_lora.data.records import Example
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.data import collate, epoch_batches, featurize
from mlas_lora.training.loss import IGNORE, predicting_positions, target_loss
from mlas_lora.training.trainer import Trainer, newest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ["en-de", "en-fi"]
EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)] + [
    Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(8)
]


def randomize_lora(model_or_layer: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Every LoRA factor random (B too), so that which LoRA a row goes through changes its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model_or_layer.named_parameters():
            if ".general." in f".{name}" or ".specific." in f".{name}":
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def test_gathered_path_equals_eq9_written_out_per_row():
    """Six pairs in one batch take the gathered path; each row must be W x + b + s_g B_g A_g x +
    s_s B_p A_p x with its own pair p (scalings 4 and 0.5, so a swapped or dropped term shows)."""
    pairs = tuple(f"en-x{i}" for i in range(6))
    config = RoutedLoRAConfig(pairs, r_gen=3, r_spe=2, alpha_gen=12.0, alpha_spe=1.0)
    torch.manual_seed(0)
    layer = RoutedLoRALinear(nn.Linear(16, 12), Router(pairs), config)
    randomize_lora(layer)
    ids = [0, 1, 2, 3, 4, 5, 2]
    x = torch.randn(len(ids), 3, 16)
    layer.router.set(ids)
    assert len(layer.router.present) > routed_lora.DENSE_MAX_PAIRS  # the gathered path, not the dense one
    with torch.no_grad():
        got = layer(x)
    w, b = layer.base.weight, layer.base.bias
    gen = layer.general
    for row, pair in enumerate(ids):
        spe = layer.specific[pairs[pair]]
        xr = x[row]
        expected = xr @ w.T + b + 4.0 * (xr @ gen.A.T @ gen.B.T) + 0.5 * (xr @ spe.A.T @ spe.B.T)
        torch.testing.assert_close(got[row], expected.detach(), atol=1e-5, rtol=1e-5)
    general_term = 4.0 * (x @ gen.A.T @ gen.B.T)
    assert general_term.abs().max() > 0.1  # dropping the general LoRA would be visible


def _routed_trainer(out_dir, examples, steps, after_step=None, **settings):
    torch.manual_seed(0)
    model = attach_routed_lora(tiny_model(), PAIRS, r_gen=4, r_spe=4)
    randomize_lora(model)
    config = TrainingConfig(
        lr=1e-2,
        micro_batch=4,
        grad_accum=1,
        max_steps=steps,
        warmup_ratio=0.0,
        checkpoint_every=1,
        **settings,
    )
    trainer = Trainer(
        model, tiny_tokenizer(), examples, PAIRS, config, out_dir, model.routing,
        lambda path: save_routed(model, path), lambda path: load_routed(model, path),
        after_step=after_step,
    )  # fmt: skip
    return model, trainer


def _hand_routed_loss(model, examples, config: TrainingConfig, pair: int) -> float:
    """The first micro-batch's target loss, every row routed to `pair` by hand."""
    features = featurize(tiny_tokenizer(), examples, PAIRS, config.max_tokens)
    first = epoch_batches(features, config.micro_batch, config.seed, 0, config.mixed_pairs)[0]
    batch = collate([features[i] for i in first], pad_id=tiny_tokenizer().pad_token_id)
    labels = batch["labels"]
    with torch.no_grad(), model.routing([pair] * len(first)):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=predicting_positions(labels != IGNORE),
        )
    return target_loss(out.logits, labels)[0].item()


def test_a_trainer_step_on_one_pair_routes_every_row_to_it(tmp_path):
    """A step on en-de rows only: the step's loss is the en-de-routed loss, en-fi's LoRA gets no
    gradient (None, so AdamW skips it) and stays bitwise, en-de's and the general LoRA move."""
    en_de = [e for e in EXAMPLES if e.pair == "en-de"]
    model, trainer = _routed_trainer(tmp_path, en_de, steps=1)
    expected = _hand_routed_loss(model, en_de, trainer.config, pair=0)
    wrong = _hand_routed_loss(model, en_de, trainer.config, pair=1)
    assert abs(expected - wrong) > 1e-3  # the routing changes the loss, so the check below can fail
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = trainer.fit(resume=None, progress=False)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-6, abs=0)
    params = dict(model.named_parameters())
    for name, value in before.items():
        if ".specific.en-fi." in name:
            assert params[name].grad is None, name
            assert torch.equal(params[name], value), name
        else:
            assert params[name].grad is not None, name
            assert not torch.equal(params[name], value), name


def test_a_resume_starts_after_the_newest_checkpoint(tmp_path):
    """Stopped at step 2 with both step 1 and step 2 resumable: the resume reads step 2, runs steps 3
    and 4 only, and ends with the weights and history of an unbroken 4-step run."""
    straight_steps, resumed_steps = [], []
    model, trainer = _routed_trainer(tmp_path / "a", EXAMPLES, 4, lambda s, _: straight_steps.append(s))
    straight = trainer.fit(progress=False)
    weights = {k: v.clone() for k, v in model.lora_state_dict().items()}
    _, trainer = _routed_trainer(tmp_path / "b", EXAMPLES, 4)
    trainer.fit(progress=False, stop_after=2)
    folder = tmp_path / "b" / "checkpoints"
    assert all((folder / f"step-00000{i}" / "training_state.pt").is_file() for i in (1, 2))
    assert newest_checkpoint(tmp_path / "b") == folder / "step-000002"
    model, trainer = _routed_trainer(tmp_path / "b", EXAMPLES, 4, lambda s, _: resumed_steps.append(s))
    resumed = trainer.fit(progress=False)
    assert straight_steps == [1, 2, 3, 4] and resumed_steps == [3, 4]
    assert resumed.steps == 4 and resumed.history == straight.history
    after = model.lora_state_dict()
    assert weights.keys() == after.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def _near_miss(reference: str) -> str:
    """A hypothesis sharing most n-grams with its reference but shorter: BLEU(h, r) != BLEU(r, h)."""
    words = reference.split()
    return " ".join(words[:-2] + words[-1:])


def test_experiment_scores_are_sacrebleu_on_the_saved_hypotheses(tmp_path, monkeypatch):
    """results/*.json hold corpus BLEU (13a) and chrF++ (word_order 2) of the hypotheses against the
    references saved under hyps/, in that order (BLEU is asymmetric: a swap changes it)."""
    from mlas_lora.experiments import run
    from test_pipeline import replace_systems, tiny_config

    def translator(system, splits, run_dir, cache):
        return lambda by_direction, split: {
            d: [_near_miss(e.reference) for e in examples] for d, examples in by_direction.items()
        }

    monkeypatch.setattr(run, "system_translator", translator)
    config = replace_systems(tiny_config(tmp_path), ["zero-shot"])
    run.run_experiment(config)
    folder = tmp_path / "run"
    checked = 0
    for split in ("valid", "test"):
        records = json.loads((folder / "results" / f"{split}.json").read_text())["records"]
        scores = {(r["direction"], r["metric"]): r["score"] for r in records if r["system"] == "zero-shot"}
        for direction in PAIRS:
            path = folder / "hyps" / "zero-shot" / f"{split}.{direction}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
            hyps, refs = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
            bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score
            chrf = sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score
            assert bleu != pytest.approx(sacrebleu.corpus_bleu(refs, [hyps], tokenize="13a").score, abs=1e-6)
            assert 0 < bleu < 100 and 0 < chrf < 100
            assert scores[direction, "bleu"] == pytest.approx(bleu, abs=1e-9)
            assert scores[direction, "chrf"] == pytest.approx(chrf, abs=1e-9)
            checked += 1
    assert checked == 4
