"""LoRA-Flow (methods/lora_flow.py, adapters/lora_fusion.py): one gate weight per LoRA per token per
layer, a one-hot gate reproduces that pair's M-i LoRA, only the gates train, resume is exact, and the
export is self-contained."""

from __future__ import annotations

import pytest
import torch

from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.config import config_from_dict
from mlas_lora.data.records import Example
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.methods import Student
from mlas_lora.methods.base import count_trainable
from mlas_lora.methods.lora_flow import LoraFlow, fuse_routed, initial_gate_bias, load_lora_flow
from mlas_lora.models.loading import load_model
from mlas_lora.testing.tiny import save_tiny, tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ["en-de", "en-fi"]
HIDDEN, LAYERS = 32, 2


def m_i(model=None, seed=0):
    """A trained-looking M-i student: per-pair LoRAs of rank 8, no general LoRA, every B random."""
    torch.manual_seed(seed)
    routed = attach_routed_lora(model or tiny_model(seed=seed), PAIRS, r_gen=0, r_spe=8, alpha_spe=16)
    with torch.no_grad():
        for layer in routed.routed_layers().values():
            for block in layer.specific.values():
                block.B.normal_(0.0, 0.1)
    return routed


def encoded(texts=("open file 3", "save the table now")):
    return tiny_tokenizer()(list(texts), return_tensors="pt", padding=True)


def gate_outputs(flow, inputs) -> list[torch.Tensor]:
    seen = []
    handles = [gate.register_forward_hook(lambda _m, _a, out: seen.append(out)) for gate in flow.gates]
    with torch.no_grad():
        flow(**inputs)
    for handle in handles:
        handle.remove()
    return seen


def test_one_weight_per_lora_per_token_per_layer():
    flow, inputs = fuse_routed(m_i()), encoded()
    tokens = inputs["input_ids"].shape[1]
    weights = gate_outputs(flow, inputs)
    assert [tuple(w.shape) for w in weights] == [(2, tokens, len(PAIRS))] * LAYERS
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in weights)  # W = 0, b = 0: uniform
    assert count_trainable(flow) == LAYERS * len(PAIRS) * (HIDDEN + 1) == 132
    assert {n for n, p in flow.named_parameters() if p.requires_grad} == {
        f"gates.{i}.{k}" for i in range(LAYERS) for k in ("weight", "bias")
    }
    with torch.no_grad():
        for gate in flow.gates:
            gate.weight.normal_()
            gate.bias.fill_(0.25)
    weights = gate_outputs(flow, inputs)
    assert weights[1][1, 0].sub(weights[1][1, 1]).abs().max() > 1e-3  # the weights vary per token
    torch.testing.assert_close(weights[1].sum(-1), torch.full((2, tokens), 1.5), rtol=0, atol=1e-6)


def test_a_one_hot_gate_reproduces_that_pairs_lora():
    routed, inputs = m_i(), encoded()
    reference = {}
    for pair in PAIRS:
        with torch.no_grad(), routed.routing([pair, pair]):
            reference[pair] = routed(**inputs).logits
    flow = fuse_routed(routed)
    with torch.no_grad():
        uniform = flow(**inputs).logits
    for i, pair in enumerate(PAIRS):
        with torch.no_grad():
            for gate in flow.gates:
                gate.bias.copy_(torch.nn.functional.one_hot(torch.tensor(i), len(PAIRS)) - 0.5)
        assert all(torch.equal(w[..., i], torch.ones_like(w[..., i])) for w in gate_outputs(flow, inputs))
        with torch.no_grad():
            torch.testing.assert_close(flow(**inputs).logits, reference[pair], rtol=0, atol=1e-6)
        assert (uniform - reference[pair]).abs().max() > 1e-3


def test_incremental_decoding_gates_each_new_token_as_a_full_forward_does():
    flow, inputs = fuse_routed(m_i()), encoded()
    with torch.no_grad():
        for gate in flow.gates:
            gate.weight.normal_()
        full = flow(**inputs).logits[:, -1]
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prefix = flow(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = flow(input_ids=ids[:, -1:], attention_mask=mask, cache=prefix.cache)
    torch.testing.assert_close(step.logits[:, -1], full, rtol=0, atol=1e-5)


EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)]
EXAMPLES += [Example("en", "fi", f"cat {i}", f"kissa {i}") for i in range(8)]


def train(out_dir, steps, stop_after=None):
    flow, method = fuse_routed(m_i()), LoraFlow()
    student = Student(flow, tiny_tokenizer())
    before = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=1, max_steps=steps, checkpoint_every=1)
    trainer = Trainer(
        flow, student.tokenizer, EXAMPLES, PAIRS, config, out_dir, method.route(student),
        lambda path: method.save(student, path), lambda path: method.load(student, path),
    )  # fmt: skip
    trainer.fit(progress=False, stop_after=stop_after)
    return before, flow


def test_only_the_gates_change_in_training(tmp_path):
    before, flow = train(tmp_path, 2)
    after = flow.state_dict()
    gates = {k for k in after if k.startswith("gates.")}
    assert len(gates) == 2 * LAYERS and any(".A" in k for k in after) and len(after) > len(gates)
    assert all(not torch.equal(before[k], after[k]) for k in gates)
    assert all(torch.equal(before[k], after[k]) for k in after if k not in gates)


def test_resume_ends_with_the_same_gates(tmp_path):
    _, straight = train(tmp_path / "a", 3)
    train(tmp_path / "b", 3, stop_after=1)
    _, resumed = train(tmp_path / "b", 3)
    assert all(
        torch.equal(a, b)
        for a, b in zip(straight.gates.parameters(), resumed.gates.parameters(), strict=True)
    )


def test_the_export_is_self_contained(tmp_path):
    path = save_tiny(tmp_path / "student", seed=2)
    flow = fuse_routed(m_i(load_model(path, dtype="float32")[0]))
    with torch.no_grad():
        for gate in flow.gates:
            gate.weight.normal_()
            gate.bias.normal_()
    config = config_from_dict(ExperimentConfig, {"models": {"student": str(path)}})
    folder = LoraFlow().export(Student(flow, tiny_tokenizer()), config, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["lora_flow.json", "lora_flow.safetensors"]
    loaded = load_lora_flow(load_model(path, dtype="float32")[0], folder)
    with torch.no_grad():
        assert torch.equal(loaded(**encoded()).logits, flow(**encoded()).logits)


def flow_config(**options):
    return config_from_dict(ExperimentConfig, {"options": options})


def test_the_gate_bias_starts_as_the_official_codes_and_the_gates_train_at_its_lr():
    method, prior = LoraFlow(), Student(m_i(), tiny_tokenizer())
    flow = method.build(flow_config(), PAIRS, prior=prior).model
    for gate in flow.gates:  # blocks.py:466: the constant [-0.5, 0.5] for two LoRAs
        assert torch.equal(gate.bias.detach(), torch.tensor([-0.5, 0.5]))
        assert not gate.weight.any()
    for weights in gate_outputs(flow, encoded()):  # softmax(0) + b = (0, 1): the second LoRA alone
        assert torch.equal(weights, torch.tensor([0.0, 1.0]).expand_as(weights))
    four = initial_gate_bias(4, "spread")
    assert four.abs().max() <= 0.5 and four.any() and len(set(four.tolist())) == 4
    torch.testing.assert_close(four, torch.tensor([-0.5, -1 / 6, 1 / 6, 0.5]), rtol=0, atol=1e-7)
    zero = method.build(flow_config(gate_bias="zero"), PAIRS, prior=Student(m_i(), tiny_tokenizer())).model
    assert all(not gate.bias.any() for gate in zero.gates)  # the first version's start: 1/P each
    assert method.training_config(flow_config()).lr == 1e-3  # README.md:81
    assert method.training_config(flow_config(lr=5e-4)).lr == 5e-4  # an lr grid sets options.lr
    keys = {
        method.train_key(flow_config(**o), {"prior": "m-i"})["gate_bias"] for o in ({}, {"gate_bias": "zero"})
    }
    assert keys == {"spread", "zero"}
    (problem,) = method.problems(flow_config(gate_bias="uniform", lr=-1.0))
    assert "'uniform'" in problem and "options.lr" in problem
