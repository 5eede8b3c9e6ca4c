"""The command line as a user runs it: stage commands on a tiny config, clear errors, exit codes."""

import pytest

from mlas_lora.cli import main
from test_pipeline import write_tiny_experiment


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path, student = write_tiny_experiment(root, "cli", "[mlas-lora]")
    return path, root, student


def test_stage_commands(tiny_config, capsys):
    path, root, student = tiny_config
    assert main(["score", str(path)]) == 0
    assert "teacher layers kept (Eq. 1)" in capsys.readouterr().out
    assert main(["classify", str(path), "awareness.lam=0.6"]) == 0
    out = capsys.readouterr().out
    assert "lambda = 0.6" in out and "general" in out and "de-en" in out
    assert main(["transfer", str(path)]) == 0
    assert "SVD energy kept" in capsys.readouterr().out
    assert main(["export", str(path)]) == 0
    capsys.readouterr()
    assert main(["export", str(path), "--check"]) == 0
    assert "pass vLLM's and PEFT's checks" in capsys.readouterr().out
    assert (root / "run" / "adapters-mlas-lora" / "de-en" / "adapter_config.json").is_file()
    capsys.readouterr()
    code = main(["translate", "--model", str(student), "--pair", "de-en", "--text", "hallo welt",
                 "--adapters", str(root / "run" / "train-mlas-lora")])  # fmt: skip
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 1


def test_errors_are_one_line_and_exit_2(tiny_config, capsys, tmp_path):
    path, _, student = tiny_config
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["run", str(path), "training.lr=abc", "lora.init_mode=x"]) == 2
    err = capsys.readouterr().err
    assert "training.lr: expected float" in err and "lora.init_mode" in err and "Traceback" not in err
    assert main(["translate", "--model", str(tmp_path / "nope"), "--pair", "en-de", "--text", "x"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["translate", "--model", str(student), "--pair", "en-xx", "--text", "x"]) == 2
    assert "unknown language code 'xx': expected an ISO 639" in capsys.readouterr().err


def test_a_failing_run_leaves_no_files_in_a_fresh_output_folder(tiny_config, capsys, tmp_path):
    path, _, _ = tiny_config
    fresh = tmp_path / "fresh"
    for command in ("run", "score"):
        assert main([command, str(path), f"output_dir={fresh}", f"data.corpus={tmp_path / 'no-corpus'}"]) == 2
        assert "does not exist" in capsys.readouterr().err
        assert not fresh.exists(), command


def test_translate_precision_choices_are_the_libraries():
    """The parser names them literally (building it must not import torch); they must stay equal."""
    from mlas_lora.cli import build_parser
    from mlas_lora.translation.generate import PRECISIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    precision = next(a for a in sub.choices["translate"]._actions if a.dest == "precision")
    assert tuple(precision.choices) == PRECISIONS and precision.default == PRECISIONS[0]
