"""Config loading: YAML + overrides, type checks, and every problem reported at once."""

from pathlib import Path

import pytest

from mlas_lora.config import config_hash, load_config, parse_overrides
from mlas_lora.errors import MlasLoraError
from mlas_lora.experiments.config import ExperimentConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("**/*.yaml"))


def test_overrides_are_parsed_as_yaml_values():
    assert parse_overrides(["training.epochs=1", "data.directions=[en-de, en-fi]", "lora.init_mode=add"]) == {
        "training": {"epochs": 1},
        "data": {"directions": ["en-de", "en-fi"]},
        "lora": {"init_mode": "add"},
    }


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntraining:\n  epochs: 2\n  lr: 0.001\n")
    config = load_config(ExperimentConfig, path, ["training.epochs=1"])
    assert config.name == "x" and config.training.epochs == 1.0 and config.training.lr == 0.001
    assert isinstance(config.training.epochs, float)


def test_every_problem_is_reported_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("bogus: 1\ntraining:\n  lr: abc\nlora:\n  init_mode: foo\ndata:\n  directions: [en-xx]\n")
    with pytest.raises(MlasLoraError) as err:
        load_config(ExperimentConfig, path)
    message = str(err.value)
    for expected in (
        "bogus: unknown key",
        "training.lr: expected float",
        "lora.init_mode: 'foo'",
        "unknown language code 'xx'",
    ):
        assert expected in message


def test_lambda_is_a_number_or_auto():
    assert load_config(ExperimentConfig, None, ["awareness.lam=auto"]).awareness.lam == "auto"
    assert load_config(ExperimentConfig, None, ["awareness.lam=0.3"]).awareness.lam == 0.3
    for bad in ("half", "1.5"):
        with pytest.raises(MlasLoraError, match="awareness.lam must be a number in \\[0, 1\\] or 'auto'"):
            load_config(ExperimentConfig, None, [f"awareness.lam={bad}"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MlasLoraError, match="config file not found"):
        load_config(ExperimentConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(MlasLoraError, match="not valid YAML"):
        load_config(ExperimentConfig, bad)
    with pytest.raises(MlasLoraError, match="expected key=value"):
        parse_overrides(["training.epochs"])


def test_config_hash_changes_with_values():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert config_hash(a) == config_hash(b)
    b.training.lr = 2e-4
    assert config_hash(a) != config_hash(b)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    from mlas_lora.experiments.systems import resolve_systems

    config = load_config(ExperimentConfig, path)
    assert config.data.directions
    assert resolve_systems(config)


def test_ablation_presets_inherit_the_embedded_config():
    from mlas_lora.methods.presets import ABLATIONS

    folder = Path(__file__).parent.parent / "configs"
    base = load_config(ExperimentConfig, folder / "embedded-4dir.yaml")
    for name in ABLATIONS:
        config = load_config(ExperimentConfig, folder / "ablations" / f"{name}.yaml")
        assert config.systems == ["mlas-lora", name] and config.name == f"ablation-{name}"
        assert (config.data, config.training, config.lora, config.output_dir) == (
            base.data,
            base.training,
            base.lora,
            base.output_dir,
        )  # only the systems change: every ablation shares the embedded run's stages


def test_base_chains_merge_and_loops_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ntraining:\n  lr: 0.5\n  epochs: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntraining:\n  lr: 0.25\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nname: c\n")
    config = load_config(ExperimentConfig, tmp_path / "c.yaml", ["training.epochs=1"])
    assert (config.name, config.training.lr, config.training.epochs) == ("c", 0.25, 1.0)
    (tmp_path / "a.yaml").write_text("base: c.yaml\n")
    with pytest.raises(MlasLoraError, match="loop"):
        load_config(ExperimentConfig, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(MlasLoraError, match=r"missing.yaml \(base of"):
        load_config(ExperimentConfig, tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("- a list\n")
    with pytest.raises(MlasLoraError, match="expected a mapping"):
        load_config(ExperimentConfig, tmp_path / "e.yaml")


def test_a_system_is_data(tmp_path):
    from mlas_lora.experiments.systems import resolve_systems

    config = load_config(
        ExperimentConfig,
        None,
        ["systems=[lora, {name: mlas-r4, method: mlas-lora, lora: {r_spe: 4}}, {name: x, preset: Mr-spe}]"],
    )
    lora, r4, x = resolve_systems(config)
    assert (lora.method.name, r4.method.name, r4.config.lora.r_spe, r4.config.lora.r_gen) == (
        "lora",
        "mlas-lora",
        4,
        8,
    )
    assert x.config.lora.structure == "per-pair" and x.config.transfer.pair_from == "specific"
    bad = load_config(
        ExperimentConfig,
        None,
        [
            "systems=[nope, {name: y, method: mlas-lora, lora: {r_spe: abc}}, {name: z, method: m, data: {}}, lora, lora]"
        ],
    )
    with pytest.raises(MlasLoraError) as err:
        resolve_systems(bad)
    for expected in ("unknown system 'nope'", "system 'y'", "r_spe", "system 'z'", "'lora' is used twice"):
        assert expected in str(err.value)


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {
        "demo.yaml",
        "prompting.yaml",
        "embedded-14dir.yaml",
        "embedded-4dir.yaml",
        "paper-wmt18.yaml",
        "paper-family-llama.yaml",
    } <= names
    family = load_config(
        ExperimentConfig, Path(__file__).parent.parent / "configs" / "paper-family-llama.yaml"
    )
    assert (
        family.models.teacher.startswith("meta-llama/Llama-3.1-70B")
        and family.data.train_per_direction == 200000
    )


def test_values_a_run_cannot_use_are_config_problems():
    bad = [
        "generation.batch_size=0", "generation.num_beams=0", "generation.max_new_tokens=-1",
        "models.dtype=int8", "lora.dropout=1.5", "evaluation.bootstrap_samples=0",
        "data.train_per_direction=-1", "data.test_per_direction=-2", "training.epochs=-1",
        "training.warmup_ratio=2", "training.max_steps=0", "training.checkpoint_every=0",
    ]  # fmt: skip
    with pytest.raises(MlasLoraError) as err:
        load_config(ExperimentConfig, None, bad)
    message = str(err.value)
    for expected in (
        "generation.batch_size must be >= 1", "generation.num_beams must be >= 1",
        "generation.max_new_tokens must be >= 1", "models.dtype: 'int8'", "lora.dropout must be in [0, 1)",
        "evaluation.bootstrap_samples must be >= 1", "data.train_per_direction must be >= 0",
        "data.test_per_direction must be >= 0", "training.epochs must be > 0",
        "training.warmup_ratio must be in [0, 1)", "training.max_steps must be >= 1",
        "training.checkpoint_every must be >= 1",
    ):  # fmt: skip
        assert expected in message, expected


def test_what_the_model_configs_rule_out_is_found_before_any_stage(tmp_path):
    from mlas_lora.experiments.systems import resolve_systems
    from mlas_lora.testing.tiny import save_tiny

    teacher, student = save_tiny(tmp_path / "t", role="teacher"), save_tiny(tmp_path / "s", role="student")
    models = [f"models.teacher={student}", f"models.student={teacher}"]  # swapped: the teacher is smaller
    config = load_config(ExperimentConfig, None, [*models, "systems=[lora, mlas-lora]", "lora.r_gen=60"])
    with pytest.raises(MlasLoraError) as err:
        resolve_systems(config)
    message = str(err.value)
    assert "rank r_gen + r_spe = 68 exceeds" in message and "'lora'" in message and "'mlas-lora'" in message
    assert "projections are smaller than the student's" in message
    unknown = load_config(
        ExperimentConfig, None, ["systems=[lora]", "evaluation.baseline_for_significance=nope"]
    )
    with pytest.raises(MlasLoraError, match="'nope' is not a system of this config"):
        resolve_systems(unknown)
