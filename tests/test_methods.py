"""Every registered method and every trained preset through one matrix (as PEFT's TEST_CASES):
build -> one training step -> save -> load -> same logits -> export; then each ablation's defining
property. A new method or preset is covered by adding one line to CASES."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from mlas_lora.config import config_from_dict
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.pipeline import initial_student, train_dir, train_key, train_stage
from mlas_lora.experiments.stages import awareness_stage, transfer_stage
from mlas_lora.experiments.systems import resolve_system, resolve_systems
from mlas_lora.methods import METHODS
from mlas_lora.methods.presets import ABLATIONS, PRESETS, TABLE2
from mlas_lora.models.loading import load_model
from mlas_lora.testing.tiny import save_tiny
from mlas_lora.transfer.extract import extract_submatrix
from test_pipeline import _write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [name for name, spec in PRESETS.items() if METHODS[spec["method"]].trains]
CASES += sorted(name for name, method in METHODS.items() if method.trains and name not in CASES)
"""Every trained preset and every trained method (by its name, with its defaults)."""
DIRECTIONS = ["en-de", "en-fi"]
TEXTS = ["open file 3", "save the table now"]


def test_every_trained_method_is_in_the_matrix():
    assert {name for name, m in METHODS.items() if m.trains} <= {
        PRESETS.get(c, {"method": c})["method"] for c in CASES
    }
    assert set(TABLE2) == {"mlas-lora", *ABLATIONS} and len(ABLATIONS) == 10


def matrix_setting(root, dtype: str):
    """(config, splits, run folder) of the matrix: tiny teacher and student in `dtype`, 1 training step."""
    _write_corpus(root / "corpus", DIRECTIONS)
    config = config_from_dict(ExperimentConfig, {
        "output_dir": str(root / "run"), "systems": CASES,
        "data": {"corpus": str(root / "corpus"), "directions": DIRECTIONS, "seed_per_direction": 4},
        "models": {"teacher": str(save_tiny(root / "teacher", role="teacher", seed=1)),
                   "student": str(save_tiny(root / "student", role="student", seed=2)), "dtype": dtype},
        "awareness": {"batch_size": 2, "lam": 0.55},
        "lora": {"r_gen": 4, "r_spe": 4, "teacher_scale": 0.5},
        "training": {"max_steps": 1, "micro_batch": 4, "grad_accum": 1, "checkpoint_every": 1, "lr": 1e-2},
    })  # fmt: skip
    return config, load_splits(config.data, ("train", "dev")), root / "run"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return matrix_setting(tmp_path_factory.mktemp("methods"), "float32")


def logits(system, student) -> torch.Tensor:
    encoded = student.tokenizer(TEXTS, return_tensors="pt", padding=True)
    route = system.method.route(student)
    with torch.no_grad(), route(["en-de", "en-fi"]) if route else torch.no_grad():
        return student.model(**encoded).logits


@pytest.mark.parametrize("name", CASES)
def test_build_train_save_load_export(tiny, name):
    config, splits, run = tiny
    system = resolve_system(name, config)
    before = logits(system, initial_student(system, splits, run))
    trained = train_stage(system, splits, run)
    trained.model.eval()
    after = logits(system, trained)
    assert not torch.allclose(before, after)  # the one step moved the function
    checkpoint = train_dir(system, run) / "checkpoints" / "step-000001" / "adapters"
    reloaded = initial_student(system, splits, run)
    system.method.load(reloaded, checkpoint)
    reloaded.model.eval()
    torch.testing.assert_close(logits(system, reloaded), after, rtol=0, atol=1e-6)
    folder = system.method.export(trained, system.config, run / f"adapters-{name}", False)
    assert folder.is_dir() and any(folder.rglob("*.safetensors"))
    assert system.method.trainable_parameters(trained) > 0
    if system.method.export_format != "peft":
        return
    configs = sorted(folder.rglob("adapter_config.json"))
    assert configs, "the export has PEFT adapter folders"
    base, _ = load_model(config.models.student, dtype="float32")
    peft = PeftModel.from_pretrained(base, str(configs[0].parent)).eval()
    pair = configs[0].parent.name if configs[0].parent != folder else "en-de"
    encoded = trained.tokenizer(TEXTS, return_tensors="pt", padding=True)
    route = system.method.route(trained)
    with torch.no_grad(), route([pair] * 2) if route else torch.no_grad():
        ours = trained.model(**encoded).logits
    with torch.no_grad():
        torch.testing.assert_close(peft(**encoded).logits, ours, rtol=0, atol=1e-5)


def test_the_lora_checkpoint_is_a_peft_folder(tiny):
    config, splits, run = tiny
    system = resolve_system("lora", config)
    train_stage(system, splits, run)
    checkpoint = train_dir(system, run) / "checkpoints" / "step-000001" / "adapters"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 8
    base, _ = load_model(config.models.student, dtype="float32")
    PeftModel.from_pretrained(base, str(checkpoint))  # loads as it is


def test_every_ablation_has_the_total_rank_of_mlas_lora(tiny):
    config, splits, run = tiny
    total = config.lora.r_gen + config.lora.r_spe
    for system in resolve_systems(config):
        if system.method.name not in ("lora", "mlas-lora") or system.name == "lora-total":
            continue  # Table 1's other baselines (and lora-total) are sized to MLAS-LoRA's parameters elsewhere
        student = initial_student(system, splits, run)
        if system.method.name == "lora":
            assert student.model.peft_config["default"].r == total
            continue
        shape = student.model.lora_config
        assert shape.r_gen + shape.r_spe == total, system.name
        scaling = config.lora.alpha_gen / config.lora.r_gen  # alpha / r kept when ranks merge
        assert shape.scaling_gen in (0.0, scaling) and shape.scaling_spe in (0.0, scaling), system.name


def test_M_i_has_no_general_lora_and_starts_at_the_base_function(tiny):
    config, splits, run = tiny
    system = resolve_system("M-i", config)
    student = initial_student(system, splits, run)
    assert student.model.lora_config.r_gen == 0 and not system.method.needs_transfer(system.config)
    base, tokenizer = load_model(config.models.student, dtype="float32")
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(logits(system, student), base(**encoded).logits)


def test_random_layer_ablations_take_other_layers_than_the_relevant_ones(tiny):
    config, splits, run = tiny
    relevant = json.loads((awareness_stage(config, splits, run)[0] / "awareness.json").read_text())
    for name in ("R-s", "Ms-a", "Ms-spe", "Ms-gen"):
        factors, _ = transfer_stage(resolve_system(name, config).config, splits, run)
        layers = list(factors.meta["layer_map"].values())
        assert layers != relevant["selected_layers"] and len(layers) == len(relevant["selected_layers"])
    for name in ("R-a", "Mr-a", "Mr-spe", "Mr-gen", "mlas-lora"):
        factors, _ = transfer_stage(resolve_system(name, config).config, splits, run)
        assert list(factors.meta["layer_map"].values()) == relevant["selected_layers"]


def chosen_rows(factors, name: str) -> dict:
    return {key: inits[name][0] for key, inits in factors.indices.items()}


def classes_of(config, splits, run) -> dict:
    return load_file(str(awareness_stage(config, splits, run)[1] / "classes.safetensors"))


def test_each_init_is_cut_from_its_neuron_set(tiny):
    """-Mr-spe from the pair's specific neurons, -Mr-gen from the general ones, -R-a / -Mr-a from all."""
    config, splits, run = tiny
    classes = classes_of(config, splits, run)
    pair = 0  # en-de
    expect = {"Mr-spe": lambda c: c == pair, "Mr-gen": lambda c: c == -1}
    for name, member in expect.items():
        factors, _ = transfer_stage(resolve_system(name, config).config, splits, run)
        assert set(factors.tensors[(0, "q")]) == set(DIRECTIONS)  # per-pair inits only, no general
        for (layer, proj), rows in chosen_rows(factors, "en-de").items():
            t_layer = factors.meta["layer_map"][str(layer)]
            cls = classes[f"class.{t_layer}.{proj}.out"]
            record = factors.meta["submatrices"][f"{layer}.{proj}.en-de"]
            inside = int(member(cls[rows]).sum())
            assert (
                inside == min(len(rows), int(member(cls).sum())) or record["head_rule_rows"] == "gqa-rotary"
            )
            assert inside + record["filled_rows"] >= len(rows)
    shared, _ = transfer_stage(resolve_system("R-a", config).config, splits, run)
    assert set(shared.tensors[(0, "q")]) == {"general"}
    assert all(r["filled_rows"] == 0 and r["filled_cols"] == 0 for r in shared.meta["submatrices"].values())


def test_Mr_spe_init_is_the_svd_of_the_pairs_specific_submatrix(tiny):
    config, splits, run = tiny
    system = resolve_system("Mr-spe", config)
    factors, _ = transfer_stage(system.config, splits, run)
    student = initial_student(system, splits, run)
    teacher, _ = load_model(config.models.teacher, dtype="float32")
    layer, proj = 1, "down"
    t_layer = factors.meta["layer_map"][str(layer)]
    rows, cols = factors.indices[(layer, proj)]["en-de"]
    weight = dict(teacher.named_parameters())[f"model.layers.{t_layer}.mlp.down_proj.weight"].detach()
    u, s, vh = torch.linalg.svd(extract_submatrix(weight, rows, cols).double(), full_matrices=False)
    rank = 8
    expected = config.lora.teacher_scale * (u[:, :rank] * s[:rank]) @ vh[:rank]
    routed = student.model.routed_layers()[(layer, proj)]
    b, a = routed.pair_update("en-de")
    torch.testing.assert_close((b.double() @ a.double()), expected, rtol=0, atol=1e-5)


def test_random_layers_are_seeded_and_never_the_relevant_set():
    from mlas_lora.transfer.plan import InitPlan, choose_layers

    relevant = [0, 1, 2]
    draws = [choose_layers(InitPlan(layers="random", seed=s), relevant, 4) for s in range(40)]
    assert relevant not in draws and len({tuple(d) for d in draws}) == 3  # the 3 other 3-of-4 sets
    assert draws == [choose_layers(InitPlan(layers="random", seed=s), relevant, 4) for s in range(40)]
    assert choose_layers(InitPlan(layers="random"), [0, 1], 2) == [0, 1]  # no other choice exists


def test_stage_keys_of_earlier_runs_stay_valid(monkeypatch):
    """Golden keys of the default config: a new setting must enter a key only where it is set (or
    not at all when it changes no result), else every finished training and translation is redone.
    They were made on CPUs with native bfloat16, where `models.dtype: auto` is bfloat16."""
    from mlas_lora.experiments.run import system_key

    monkeypatch.setattr("mlas_lora.models.loading.cpu_has_fast_bf16", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    config = ExperimentConfig()
    # translation keys of trained systems changed once on purpose (2026-11-27): `generation.precision`
    # decodes them under the training autocast, a different function from float32 LoRAs; and every
    # translation key once more (2026-12-05): continuous batching (batch 64, prefix cache) replaced the
    # bucketed loop, whose hypotheses differ by batch rounding; and again (2026-12-06): a split's key
    # leaves out the other splits' sizes (system_key is the test split's); training keys are unchanged
    golden = {
        "lora": ("640b2f16a78fa31d", "9e8a08403723c2ff"),
        "mlas-lora": ("b746e9dc8ae58c63", "174913edafdc4721"),
        "M-i": ("f326f06cf2d0b53d", "01ce72abbf6bce21"),
    }
    for name, (trained, translated) in golden.items():
        system = resolve_system(name, config)
        assert (train_key(system), system_key(system)) == (trained, translated), name
    assert system_key(resolve_system("zero-shot", config)) == "fe2e51055112f53e"


def test_keys_name_the_dtype_auto_resolves_to(monkeypatch):
    """`models.dtype: auto` is bfloat16 on a CPU with native bfloat16 and float32 elsewhere: two
    functions, so every key tells them apart (a cell carried between machines must not pass for the
    other); explicit dtypes are keyed as written."""
    from mlas_lora.experiments.run import system_key
    from mlas_lora.experiments.stages import awareness_keys

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = ExperimentConfig()
    keys = {}
    for fast in (True, False):
        monkeypatch.setattr("mlas_lora.models.loading.cpu_has_fast_bf16", lambda fast=fast: fast)
        keys[fast] = [
            *(train_key(resolve_system(n, config)) for n in ("lora", "mlas-lora")),
            *(system_key(resolve_system(n, config)) for n in ("zero-shot", "lora", "mlas-lora")),
            awareness_keys(config)[0],
        ]
    assert all(a != b for a, b in zip(keys[True], keys[False], strict=True))
    fixed = replace(config, models=replace(config.models, dtype="float32"))
    assert train_key(resolve_system("lora", fixed)) not in (keys[True][0], keys[False][0])


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """The matrix's setting on a bfloat16 student and teacher: adapters float32 beside bf16 weights."""
    return matrix_setting(tmp_path_factory.mktemp("methods-bf16"), "bfloat16")


@pytest.mark.parametrize("name", CASES)
def test_evaluation_decodes_the_function_training_computed(tiny_bf16, name):
    """Every trained method, as the experiment translates with it (for_evaluation, decode_scope,
    translate's default precision), trained in this process or loaded from its checkpoint as after a
    restart: its first logits equal, bit for bit, those of the trainer's
    forward (the method's routing, under the bf16 autocast where the trainer uses one: not for
    full-ft, whose float32 weights train in float32) on the same prompt."""
    from mlas_lora.prompting import PromptStyle, build_prompt, prompt_ids
    from mlas_lora.translation.baselines import zero_shot_requests
    from mlas_lora.translation.generate import GenerationConfig, trains_under_autocast, translate

    config, splits, run = tiny_bf16
    system = resolve_system(name, config)
    examples = splits.dev["en-de"][:1]

    def first_logits(student) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = student.model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].float()))
        scope, context = system.method.decode_scope(student, examples, "none")
        with scope:
            translate(
                student.model,
                student.tokenizer,
                zero_shot_requests(examples),
                GenerationConfig(max_new_tokens=1),
                batch_context=context,
                progress=False,
            )
        hook.remove()
        return seen[0]

    student = system.method.for_evaluation(train_stage(system, splits, run), "none")
    translated = first_logits(student)
    reloaded = initial_student(system, splits, run)  # the same model from its checkpoint, as after a restart
    system.method.load(reloaded, train_dir(system, run) / "checkpoints" / "step-000001" / "adapters")
    assert torch.equal(first_logits(system.method.for_evaluation(reloaded, "none")), translated)
    request = zero_shot_requests(examples)[0]
    ids = prompt_ids(
        student.tokenizer, build_prompt(student.tokenizer, "en", "de", request.source), PromptStyle()
    )
    route = system.method.route(student)
    with (
        torch.no_grad(),
        route(["en-de"]) if route else torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=trains_under_autocast(student.model)),
    ):
        trained = student.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[:, -1].float()
    assert torch.equal(translated, trained)
