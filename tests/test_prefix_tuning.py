"""P-Tuning v2 (methods/prefix_tuning.py, adapters/prefix_decoding.py): the trainer's loss sits on the
target positions of a prefix model, training leaves every base weight bitwise unchanged, and our
decoder runs the prefix through translate's cached loop as a full forward does."""

import pytest
import torch
import torch.nn.functional as F
from peft import PrefixTuningConfig, get_peft_model

from mlas_lora.adapters.budget import mlas_lora_parameters
from mlas_lora.adapters.prefix_decoding import PrefixDecoder
from mlas_lora.adapters.routed_lora import attach_routed_lora
from mlas_lora.config import config_from_dict
from mlas_lora.data.records import Example
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig, LoraSettings
from mlas_lora.methods import METHODS, Student
from mlas_lora.methods.base import count_trainable
from mlas_lora.methods.prefix_tuning import matching_hidden_size, prefix_parameters
from mlas_lora.models.arch import ArchInfo, describe
from mlas_lora.prompting import PromptStyle, build_prompt, prompt_ids
from mlas_lora.testing.tiny import save_tiny, tiny_model, tiny_tokenizer
from mlas_lora.training.config import TrainingConfig
from mlas_lora.training.data import collate, featurize
from mlas_lora.training.loss import IGNORE, predicting_positions, target_loss
from mlas_lora.training.trainer import Trainer
from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ["en-de", "en-fi"]
EXAMPLES = [Example("en", "de", f"hello {i}", f"hallo {i}") for i in range(8)] + [
    Example("en", "fi", f"cat number {i}", f"kissa {i}") for i in range(8)
]
QWEN_05B = ArchInfo("qwen2", 24, 896, 4864, 14, 2, 64)


def prefixed(family: str = "qwen2", n: int = 4, scale: float = 1.0):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_model(family), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(scale)
    return model


def test_the_loss_sits_on_the_target_positions_of_a_prefix_model():
    """PEFT widens the mask by the virtual tokens but the logits stay over the real tokens, so the
    trainer's boolean logits_to_keep and labels line up: its loss equals the loss over full logits."""
    model, tokenizer = prefixed(scale=3.0), tiny_tokenizer()
    batch = collate(featurize(tokenizer, EXAMPLES[6:10], PAIRS, 256), 0)
    labels = batch["labels"]
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        kept = model(**inputs, logits_to_keep=predicting_positions(labels != IGNORE)).logits
        full = model(**inputs).logits
        base = model.get_base_model()(**inputs).logits
    loss, _, counts = target_loss(kept, labels)
    targets = labels[:, 1:] != IGNORE
    expected = F.cross_entropy(full[:, :-1][targets], labels[:, 1:][targets])
    assert full.shape[1] == labels.shape[1] and kept.shape[0] == int(counts.sum())
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert abs(float(F.cross_entropy(base[:, :-1][targets], labels[:, 1:][targets]) - expected)) > 1e-2


def test_training_leaves_every_base_weight_bitwise_unchanged(tmp_path):
    model = prefixed()
    base = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    prefix = model.prompt_encoder["default"].embedding.weight.detach().clone()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.embedding.weight"
    ]
    config = TrainingConfig(lr=1e-2, micro_batch=4, grad_accum=1, max_steps=3, checkpoint_every=3)
    Trainer(
        model,
        tiny_tokenizer(),
        EXAMPLES,
        PAIRS,
        config,
        tmp_path,
        None,
        lambda path: model.save_pretrained(str(path)),
        lambda path: None,
    ).fit(progress=False)
    after = dict(model.get_base_model().named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert not torch.allclose(model.prompt_encoder["default"].embedding.weight, prefix)


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_cached_decoding_gives_the_full_forward_logits(family):
    """Prefill a left-padded batch, then two tokens, through the cache as translate's loop does: the
    last logits are those of PEFT's full forward over each unpadded row."""
    from transformers import DynamicCache

    model = prefixed(family, scale=3.0).eval()
    decoder = PrefixDecoder(model)
    rows = [[5, 60, 7, 100, 9], [40, 41, 42]]
    steps = [[70, 71], [80, 81]]
    ids = torch.tensor([[0, 0] + rows[1] if len(r) == 3 else r for r in rows])
    attention = (ids != 0).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=decoder.config)
    with torch.no_grad():
        decoder(
            input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache, logits_to_keep=1
        )
        for k in range(2):
            attention = torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            token = torch.tensor([[s[k]] for s in steps])
            last = decoder(
                input_ids=token, attention_mask=attention, position_ids=positions, cache=cache
            ).logits
        for row, (prompt, step) in enumerate(zip(rows, steps, strict=True)):
            full = model(input_ids=torch.tensor([prompt + step])).logits[0, -1]
            torch.testing.assert_close(last[row, -1], full, rtol=0, atol=1e-5)
        assert not torch.allclose(full, model.get_base_model()(torch.tensor([prompt + step])).logits[0, -1])


@pytest.mark.parametrize("family, scale", [("gemma2", 3.0), ("llama", 10.0)])
def test_translate_decodes_with_the_prefix(family, scale):
    """translate(PrefixDecoder) = greedy by full forwards of the PEFT model, not the base model's: through
    the bucketed loop (Gemma 2's window is shorter than the prompts) and through continuous batching with
    the prompt prefix cached and rows joining a running batch (Llama: the virtual tokens stay in front)."""
    model, tokenizer = prefixed(family, scale=scale).eval(), tiny_tokenizer()
    config = GenerationConfig(max_new_tokens=6, length_ratio=0, length_margin=6, batch_size=2)
    sources = ["open file 3", "save the table now", "x", "close all windows", "a b"]
    requests = [TranslationRequest("en", "de", s) for s in sources]
    ours = translate(PrefixDecoder(model), tokenizer, requests, config, progress=False)
    style = PromptStyle(chat=config.chat)
    expected = []
    with torch.no_grad():
        for source in sources:
            ids = torch.tensor(
                [prompt_ids(tokenizer, build_prompt(tokenizer, "en", "de", source, (), style), style)]
            )
            width = ids.shape[1]
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            expected.append(
                tokenizer.decode(ids[0, width:], skip_special_tokens=True).strip().split("\n")[0].strip()
            )
    assert ours == expected
    assert ours != translate(model.get_base_model(), tokenizer, requests, config, progress=False)
    with pytest.raises(MlasLoraError, match="greedy loop"):
        PrefixDecoder(model).generate()


def test_the_default_mlp_matches_mlas_lora_and_counts_like_peft():
    lora = LoraSettings(r_gen=4, r_spe=4)
    tiny = describe(tiny_model())
    budget = mlas_lora_parameters(tiny, lora, n_pairs=2)
    assert budget == count_trainable(attach_routed_lora(tiny_model(), PAIRS, r_gen=4, r_spe=4)) == 12288
    hidden = matching_hidden_size(tiny, 16, budget)
    assert abs(prefix_parameters(tiny, 16, hidden) - budget) <= prefix_parameters(
        tiny, 16, 1
    ) - prefix_parameters(tiny, 16, 0)
    for n, width in [(16, hidden), (5, None)]:
        peft_config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prefix_projection=width is not None,
            encoder_hidden_size=width,
        )
        assert count_trainable(get_peft_model(tiny_model(), peft_config)) == prefix_parameters(tiny, n, width)
    qwen = mlas_lora_parameters(QWEN_05B, LoraSettings(r_gen=8, r_spe=8), n_pairs=4)
    assert qwen == 21_995_520 and matching_hidden_size(QWEN_05B, 16, qwen) == 3505
    assert prefix_parameters(QWEN_05B, 16, 3505) == 21_995_057 and prefix_parameters(QWEN_05B, 3580) == qwen


def prefix_of(student) -> torch.Tensor:
    encoder = student.model.prompt_encoder[student.model.active_adapter]
    with torch.no_grad():
        return encoder(torch.arange(student.model.active_peft_config.num_virtual_tokens))


def test_the_prefix_starts_random_seeded_by_training_seed_or_at_zero(tmp_path):
    """P-Tuning v2's (and PEFT's default) init: P != 0 at step 0, drawn from training.seed."""
    method = METHODS["p-tuning"]
    models = {"student": str(save_tiny(tmp_path / "student", role="student", seed=2)), "dtype": "float32"}
    first = method.build(_config(models=models), PAIRS)
    prefix = prefix_of(first)
    assert prefix.abs().min() > 0 and method.update_norms(first)()["prefix_rms"] > 0.01
    assert torch.equal(prefix_of(method.build(_config(models=models), PAIRS)), prefix)
    other_seed = _config(models=models)
    other_seed.training.seed += 1
    assert not torch.equal(prefix_of(method.build(other_seed, PAIRS)), prefix)
    zero = method.build(_config(models=models, init="zero"), PAIRS)
    assert method.update_norms(zero)() == {"prefix_rms": 0.0}
    assert method.train_key(_config(), {})["init"] == "random"
    assert method.train_key(_config(init="zero"), {})["init"] == "zero"  # the first version's key


def test_a_checkpoint_resumes_the_mlp_exactly(tmp_path):
    """After a step, save -> load into a fresh student gives the same encoder (MLP included, which
    PEFT's own folder does not keep) and the same logits."""
    method = METHODS["p-tuning"]
    config = _config(
        models={"student": str(save_tiny(tmp_path / "student", role="student", seed=2)), "dtype": "float32"}
    )
    student = method.build(config, PAIRS)
    norms = method.update_norms(student)
    assert method.trainable_parameters(student) == prefix_parameters(
        describe(student.model.get_base_model()),
        16,
        method.encoder_hidden_size(config, describe(student.model), 2),
    )
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    assert len(trainable) == 5  # embedding, W1, b1, W2, b2
    before = norms()["prefix_rms"]
    with torch.no_grad():
        for p in trainable:
            p.add_(0.01 * torch.randn_like(p))
    assert norms()["prefix_rms"] != before
    method.save(student, tmp_path / "ckpt")
    fresh = method.build(config, PAIRS)
    method.load(fresh, tmp_path / "ckpt")
    for (name, a), b in zip(student.model.named_parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[5, 60, 7, 100, 9]])
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(input_ids=ids).logits, student.model(input_ids=ids).logits, rtol=0, atol=0
        )
    other = method.build(_config(models=config.models.__dict__, num_virtual_tokens=3), PAIRS)
    with pytest.raises(MlasLoraError, match="trains"):
        method.load(other, tmp_path / "ckpt")


def _config(generation=None, models=None, **options):
    return config_from_dict(
        ExperimentConfig,
        {
            "lora": {"r_gen": 4, "r_spe": 4},
            "options": options,
            "generation": generation or {},
            "models": models or {},
        },
    )


def test_options_and_beam_search_are_checked_and_evaluation_uses_the_decoder():
    method = METHODS["p-tuning"]
    assert method.problems(_config()) == []
    assert len(method.problems(_config({"num_beams": 2}, num_virtual_tokens=0))) == 2
    assert len(method.problems(_config(prefix_projection=False, encoder_hidden_size=8))) == 1
    assert len(method.problems(_config(encoder_hidden_size=0))) == 1
    assert method.problems(_config(init="normal")) == ["options.init: 'normal' (known: random, zero)"]
    assert "budget" in method.train_key(_config(), {})
    assert "budget" not in method.train_key(_config(encoder_hidden_size=8), {})
    assert "budget" not in method.train_key(_config(prefix_projection=False), {})
    student = method.for_evaluation(Student(prefixed(), tiny_tokenizer()), "weights")
    assert isinstance(student.model, PrefixDecoder)
