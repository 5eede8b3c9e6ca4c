"""On a GPU (skipped without one): one process puts the teacher, the student's training and every
system's decoding on it, and batches of any width score and train there. `scripts/gpu_check.sh` runs
these with the rest of the suite; the CPU parts (padding leaves scores and losses unchanged) run
everywhere."""

import pytest
import torch

import dist_scoring_script
from mlas_lora.awareness.scoring import collate as scoring_collate
from mlas_lora.awareness.scoring import seed_target_loss
from mlas_lora.testing.tiny import tiny_model
from mlas_lora.training.data import GPU_WIDTH_MULTIPLE, collate, width_multiple
from mlas_lora.training.loss import predicting_positions, target_loss
from test_pipeline import tiny_config

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


ODD = [(list(range(5, 12)), list(range(12, 16))), (list(range(20, 24)), list(range(24, 27)))]
"""Two seed rows, the longer 11 tokens (not a multiple of 4)."""


def test_padding_a_scoring_batch_leaves_its_loss_and_gradients_unchanged():
    model = tiny_model("qwen2", "teacher", seed=0)
    batch = scoring_collate(ODD, pad_id=0)
    padded = scoring_collate(ODD, pad_id=0, multiple=GPU_WIDTH_MULTIPLE)
    assert batch.input_ids.shape[1] == 11 and padded.input_ids.shape[1] == 16
    assert padded.tokens.sum() == batch.tokens.sum() and padded.targets.sum() == batch.targets.sum()
    assert padded.sources.sum() == batch.sources.sum()
    grads = []
    for b in (batch, padded):
        model.zero_grad()
        loss = seed_target_loss(model, b)
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)
    assert torch.equal(scoring_collate(ODD, pad_id=0, multiple=1).input_ids, batch.input_ids)
    assert (
        width_multiple(torch.device("cuda")) == GPU_WIDTH_MULTIPLE
        and width_multiple(torch.device("cpu")) == 1
    )


def test_a_training_batch_padded_to_a_multiple_has_the_same_loss():
    from mlas_lora.training.data import Feature

    features = [Feature([5, 6, 7, 8, 9], [-100, -100, -100, 8, 9], 0), Feature([5, 6, 7], [-100, 6, 7], 1)]
    model = tiny_model("qwen2", "student", seed=0)
    losses = []
    for multiple in (1, GPU_WIDTH_MULTIPLE):
        batch = collate(features, pad_id=0, multiple=multiple)
        assert batch["input_ids"].shape[1] == (5 if multiple == 1 else 8)
        labels = batch["labels"]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=predicting_positions(labels != -100),
        )
        losses.append(target_loss(out.logits, labels)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)


@needs_gpu
@pytest.mark.gpu
def test_scoring_on_the_gpu_takes_any_width_and_matches_the_cpu():
    """Before the padding, the SDPA backward refused the 11-token batch: "attn_bias is not correctly
    aligned (strideM)". Float32 scores on the GPU equal the CPU's to float tolerance."""
    want = dist_scoring_script.score()
    got = dist_scoring_script.score(tiny_model("qwen2", "teacher", seed=0).cuda())
    for key, phi in want.phi.items():
        torch.testing.assert_close(got.phi[key].cpu(), phi, rtol=1e-3, atol=1e-6)
    assert got.selected_layers == want.selected_layers


@needs_gpu
@pytest.mark.gpu
def test_one_process_runs_every_stage_on_the_gpu(tmp_path, monkeypatch):
    """Without a launcher, the teacher scores, the student trains and every system decodes on the GPU
    (before, the teacher and the untuned or reloaded students stayed on the CPU)."""
    import mlas_lora.experiments.run as run_module
    import mlas_lora.models.loading as loading
    import mlas_lora.translation.generate as generate
    from mlas_lora.awareness import scoring
    from mlas_lora.training.trainer import Trainer

    seen = {"load": [], "score": [], "train": [], "decode": []}
    load, score, fit, translate = loading.load_model, scoring.score_teacher, Trainer.fit, generate.translate

    def spy_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        seen["load"].append(next(model.parameters()).device.type)
        return model, tokenizer

    def spy_score(model, *args, **kwargs):
        seen["score"].append(next(model.parameters()).device.type)
        return score(model, *args, **kwargs)

    def spy_fit(self, *args, **kwargs):
        seen["train"].append(self.accelerator.device.type)
        return fit(self, *args, **kwargs)

    def spy_translate(model, *args, **kwargs):
        seen["decode"].append(next(model.parameters()).device.type)
        return translate(model, *args, **kwargs)

    monkeypatch.setattr(loading, "load_model", spy_load)
    monkeypatch.setattr(scoring, "score_teacher", spy_score)
    monkeypatch.setattr(Trainer, "fit", spy_fit)
    monkeypatch.setattr(generate, "translate", spy_translate)
    monkeypatch.setattr(run_module, "translate", spy_translate)

    config = tiny_config(tmp_path, dtype="auto")  # bfloat16 on the GPU
    run_module.run_experiment(config)
    assert seen["score"] == ["cuda"] and seen["train"] == ["cuda", "cuda"]
    assert seen["decode"] and set(seen["decode"]) == {"cuda"}, seen
    assert set(seen["load"]) - {"cpu"} == {"cuda"}  # the transfer reads the teacher on the CPU
    seen.update(load=[], score=[], train=[], decode=[])
    (tmp_path / "run" / "hyps").rename(tmp_path / "hyps-first")  # decode again from the reloaded students
    run_module.run_experiment(config)
    assert seen["score"] == [] and seen["train"] == [] and set(seen["decode"]) == {"cuda"}, seen
