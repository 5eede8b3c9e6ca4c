"""The training loop: target-only loss, seeded data order, and resume == uninterrupted run."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.testing.tiny import tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.data import collate, epoch_batches, featurize
from mlas_lora.training.loss import TokenCrossEntropy, predicting_positions, target_loss
from mlas_lora.training.trainer import Trainer

PAIRS = ["en-de", "en-fi"]
EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(12)] + [
    Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(12)
]


def test_labels_cover_target_only():
    tok = tiny_tokenizer()
    (feature,) = featurize(tok, EXAMPLES[:1], PAIRS, max_tokens=256)
    target = [t for t in feature.labels if t != -100]
    assert tok.decode(target) == " hallo 0<|im_end|>"
    assert feature.input_ids[-len(target) :] == target and feature.pair_index == 0


def test_target_loss_ignores_prompt_and_padding():
    full = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    keep = predicting_positions(labels != -100)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    loss, sums, counts = target_loss(full[keep], labels)
    by_hand = [
        F.cross_entropy(full[0, 1:3], labels[0, 2:4], reduction="sum"),
        F.cross_entropy(full[1, :4], labels[1, 1:], reduction="sum"),
    ]
    torch.testing.assert_close(sums, torch.stack(by_hand))
    assert counts.tolist() == [2, 4]
    torch.testing.assert_close(loss, sums.sum() / 6)


def test_token_cross_entropy_matches_torch_and_gradcheck():
    torch.manual_seed(0)
    logits = torch.randn(70, 50, dtype=torch.float64, requires_grad=True)  # 3 chunks of rows
    labels = torch.randint(0, 50, (70,))
    torch.testing.assert_close(
        TokenCrossEntropy.apply(logits, labels), F.cross_entropy(logits, labels, reduction="none")
    )
    weights = torch.rand(70, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (TokenCrossEntropy.apply(x, labels) * weights).sum(), (logits,))
    half = logits.detach().bfloat16().requires_grad_()
    nll = TokenCrossEntropy.apply(half, labels)
    assert nll.dtype == torch.float32
    nll.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_epoch_order_is_seeded_and_homogeneous_batches_hold_one_pair():
    tok = tiny_tokenizer()
    features = featurize(tok, EXAMPLES, PAIRS, 256)
    assert epoch_batches(features, 4, 0, 1, True) == epoch_batches(features, 4, 0, 1, True)
    assert epoch_batches(features, 4, 0, 1, True) != epoch_batches(features, 4, 0, 2, True)
    for batch in epoch_batches(features, 4, 0, 0, mixed=False):
        assert len({features[i].pair_index for i in batch}) == 1
    assert sorted(i for b in epoch_batches(features, 5, 0, 0, False) for i in b) == list(range(24))
    batch = collate([features[0], features[13]], pad_id=0)
    assert batch["pair_ids"].tolist() == [0, 1] and batch["attention_mask"].sum() == len(
        features[0].input_ids
    ) + len(features[13].input_ids)


def _run(out_dir, steps, stop_after=None, resume="auto", **settings):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )

    def save(path):
        save_file(get_peft_model_state_dict(model), str(path / "adapter.safetensors"))

    def load(path):
        set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors")))

    config = TrainingConfig(
        lr=1e-2,
        micro_batch=4,
        grad_accum=2,
        max_steps=steps,
        checkpoint_every=1,
        warmup_ratio=0.25,
        **settings,
    )
    trainer = Trainer(model, tiny_tokenizer(), EXAMPLES, PAIRS, config, out_dir, None, save, load)
    result = trainer.fit(resume=resume, progress=False, stop_after=stop_after)
    return get_peft_model_state_dict(model), result


def test_resume_ends_with_the_same_adapters(tmp_path):
    """2 steps + resume + 2 steps == 4 steps, bitwise, on CPU (torchtune's resume test)."""
    straight, result = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 4, stop_after=2)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
    ]
    resumed, resumed_result = _run(tmp_path / "b", 4)
    assert resumed_result.steps == 4 and resumed_result.history == result.history
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start, _ = _run(tmp_path / "c", 0)
    assert any(not torch.equal(start[k], straight[k]) for k in straight), "training must move the adapters"


def _run_routed(out_dir, steps, stop_after=None):
    from mlas_lora.adapters.export import load_routed, save_routed
    from mlas_lora.adapters.routed_lora import attach_routed_lora

    torch.manual_seed(0)
    model = attach_routed_lora(tiny_model(), PAIRS, r_gen=4, r_spe=4)
    config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=2, max_steps=steps, checkpoint_every=1)
    trainer = Trainer(
        model, tiny_tokenizer(), EXAMPLES, PAIRS, config, out_dir, model.routing,
        lambda path: save_routed(model, path), lambda path: load_routed(model, path),
    )  # fmt: skip
    trainer.fit(progress=False, stop_after=stop_after)
    return model.lora_state_dict()


def test_routed_resume_ends_with_the_same_adapters(tmp_path):
    straight = _run_routed(tmp_path / "a", 3)
    _run_routed(tmp_path / "b", 3, stop_after=1)
    resumed = _run_routed(tmp_path / "b", 3)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start = _run_routed(tmp_path / "c", 0)
    assert any(not torch.equal(start[k], straight[k]) for k in straight)


def test_a_save_killed_halfway_neither_blocks_nor_is_resumed(tmp_path):
    """A kill during a save leaves `step-N.tmp` (here with an empty state file): the next run resumes
    from the last complete checkpoint, removes the partial one, and ends where an unbroken run ends."""
    straight, _ = _run(tmp_path / "a", 3)
    _run(tmp_path / "b", 3, stop_after=2)
    partial = tmp_path / "b" / "checkpoints" / "step-000003.tmp"
    (partial / "adapters").mkdir(parents=True)
    (partial / "training_state.pt").write_bytes(b"")
    resumed, result = _run(tmp_path / "b", 3)
    assert result.steps == 3 and not partial.exists()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    _run(tmp_path / "a", 4)
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]  # keep_checkpoints 2


def test_older_checkpoints_drop_their_training_state_and_a_resume_reads_the_newest(tmp_path):
    """keep_checkpoints null, keep_states 1: every step keeps its adapters (curve reads them), only the
    newest keeps its training state; a run stopped at 3 resumes from it and ends as an unbroken run."""
    from mlas_lora.experiments.curve import checkpoints
    from mlas_lora.training.trainer import STATE, newest_checkpoint

    straight, result = _run(tmp_path / "a", 4, keep_checkpoints=None, keep_states=1)
    _run(tmp_path / "b", 4, stop_after=3, keep_checkpoints=None, keep_states=1)
    folder = tmp_path / "b" / "checkpoints"
    assert [(p.name, (p / STATE).is_file()) for p in sorted(folder.iterdir())] == [
        ("step-000001", False),
        ("step-000002", False),
        ("step-000003", True),
    ]
    assert sorted(checkpoints(tmp_path / "b")) == [1, 2, 3]
    assert newest_checkpoint(tmp_path / "b") == folder / "step-000003"
    resumed, resumed_result = _run(tmp_path / "b", 4, keep_checkpoints=None, keep_states=1)
    assert resumed_result.history == result.history
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [(folder / f"step-00000{i}" / STATE).is_file() for i in range(1, 5)] == [False] * 3 + [True]
    with pytest.raises(MlasLoraError, match="adapters only.*resume from .*step-000004"):
        _run(tmp_path / "b", 4, keep_checkpoints=None, keep_states=1, resume=folder / "step-000002")


def test_keep_states_must_leave_one_to_resume_from():
    assert TrainingConfig(keep_states=0).problems() == [
        "training.keep_states must be >= 1 (a resume needs the newest), got 0"
    ]
    assert "keep_states" not in TrainingConfig().key_settings()


def test_a_crafted_training_state_runs_no_code(tmp_path):
    import os
    import pickle

    _run(tmp_path / "a", 2, stop_after=1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = tmp_path / "a" / "checkpoints" / "step-000001" / "training_state.pt"
    state.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(MlasLoraError, match="unreadable training state"):
        _run(tmp_path / "a", 2)
    assert not marker.exists()


def test_bf16_and_float32_trainers_share_a_process_and_leave_forward_alone(tmp_path):
    """A bf16 run (autocast) and then a float32 one (full-ft's weights) train in one process, and
    neither leaves an autocast wrapped around the model's forward: a model trained in this process
    decodes as the same model loaded from its checkpoint does."""
    for k, bf16 in enumerate((True, False)):
        model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
        if bf16:
            model = model.to(torch.bfloat16)
        config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=1, max_steps=1, checkpoint_every=1)
        trainer = Trainer(
            model, tiny_tokenizer(), EXAMPLES, PAIRS, config, tmp_path / str(k), None,
            lambda path: None, lambda path: None, bf16=bf16,
        )  # fmt: skip
        assert trainer.fit(progress=False).steps == 1
        assert "forward" not in vars(model) and "forward" not in vars(model.base_model.model)


VARIED = [Example("en", "de", "word " * (1 + i % 7), "wort " * (1 + (i * 3) % 5)) for i in range(16)] + [
    Example("en", "fi", "cat " * (1 + i % 4), "kissa " * (2 + i % 6)) for i in range(16)
]


def _step_gradients(tmp_path, micro_batch: int, grad_accum: int, group: bool):
    """(gradients of the first step by name, the step's micro-batches as example ids) of a tiny LoRA."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    )
    config = TrainingConfig(
        lr=1e-2, micro_batch=micro_batch, grad_accum=grad_accum, max_steps=1, group_by_length=group
    )
    trainer = Trainer(
        model, tiny_tokenizer(), VARIED, PAIRS, config, tmp_path, None, lambda p: None, lambda p: None
    )
    seen: list[dict] = []
    trainer.optimizer.step = lambda *a, **k: seen.append(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    )
    micro = trainer._step_micro_batches(0)
    trainer.fit(progress=False)
    ids = {id(f): i for i, f in enumerate(trainer.features)}
    return seen[0], [[ids[id(f)] for f in batch] for batch in micro], trainer


def test_length_grouping_keeps_each_steps_examples_and_its_gradient(tmp_path):
    """With group_by_length, a step holds the examples it holds without it, in fewer padded tokens, and
    its gradient is the token mean over the whole step however the step is cut (8 x 1, 4 x 2, 2 x 4)."""
    one, one_ids, _ = _step_gradients(tmp_path / "a", 8, 1, group=False)
    grads = {}
    for mb, ga in ((8, 1), (4, 2), (2, 4)):
        grads[mb], ids, trainer = _step_gradients(tmp_path / f"g{mb}", mb, ga, group=True)
        assert sorted(i for b in ids for i in b) == sorted(one_ids[0]), "the step's examples"
        lengths = [len(trainer.features[i].input_ids) for b in ids for i in b]
        assert lengths == sorted(lengths)
        for name, g in one.items():
            torch.testing.assert_close(grads[mb][name], g, rtol=1e-5, atol=1e-7)
    plain, plain_ids, trainer = _step_gradients(tmp_path / "p", 2, 4, group=False)

    def padded(ids):
        return sum(max(len(trainer.features[i].input_ids) for i in b) * len(b) for b in ids)

    _, grouped_ids, _ = _step_gradients(tmp_path / "q", 2, 4, group=True)
    assert padded(grouped_ids) < padded(plain_ids)
    assert any(not torch.allclose(plain[n], one[n], rtol=1e-5, atol=1e-7) for n in one), (
        "ungrouped micro-batches weigh each micro-batch's mean alike: another gradient, or the test shows nothing"
    )


def test_a_grouped_training_resumes_exactly(tmp_path):
    straight, _ = _run(tmp_path / "a", 4, group_by_length=True)
    _run(tmp_path / "b", 4, stop_after=2, group_by_length=True)
    resumed, _ = _run(tmp_path / "b", 4, group_by_length=True)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
