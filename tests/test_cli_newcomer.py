"""The command line's rough edges a newcomer met (issue 24): overrides anywhere on the line, budget
choices and defaults in --help, a mistyped experiment name, --version, one-line errors, `run
--systems`, `data wordnet`, a missing COMET checkpoint, and a failing run that leaves nothing."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from mlas_lora.cli import main
from mlas_lora.errors import MlasLoraError
from test_hardening_cli import one_line_error
from test_pipeline import write_tiny_experiment

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A two-direction config of zero-shot, LoRA and MLAS-LoRA on a tiny corpus and tiny models."""
    root = tmp_path_factory.mktemp("newcomer")
    path, _ = write_tiny_experiment(
        root,
        "newcomer",
        "[zero-shot, lora, mlas-lora]",
        evaluation="{metrics: [bleu, chrf], bootstrap_samples: 10}",
    )
    return path


def help_text(capsys, argv: list[str]) -> str:
    """`--help` of a command, whitespace collapsed (argparse wraps to the terminal's width)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_overrides_are_taken_after_flags_too(tiny_config, tmp_path, capsys):
    from mlas_lora.cli import parse_args

    args = parse_args(["experiment", "table2", "c.yaml", "a=1", "--systems", "lora,mlas-lora", "b=2",
                       "--budget", "cpu", "c=[x,y]", "--seeds=2", "d=3"])  # fmt: skip
    assert (args.config, args.systems, args.budget, args.seeds) == ("c.yaml", "lora,mlas-lora", "cpu", 2)
    assert args.overrides == ["a=1", "b=2", "c=[x,y]", "d=3"]  # in order: a later one wins
    for stray in (["run", "c.yaml", "--force", "junk"], ["run", "c.yaml", "--sytems=lora", "a=1"]):
        with pytest.raises(SystemExit):  # an unknown flag or a bare word is still refused
            parse_args(stray)
    assert "unrecognized arguments" in capsys.readouterr().err
    out = tmp_path / "elsewhere"
    assert main(["train", str(tiny_config), "--system", "lora", f"output_dir={out}"]) == 0
    assert (out / "train-lora").is_dir() and (out / "adapters-lora" / "adapter_config.json").is_file()


def test_budget_choices_and_defaults_show_in_help(capsys):
    from mlas_lora.experiments.experiment import BUDGETS

    text = help_text(capsys, ["experiment", "--help"])
    assert "--budget {" + ",".join(BUDGETS) + "}" in text and "cpu-small" in text and "verdict" in text
    assert "(default: en-de)" in text and "(default: gemma3-270m)" in text
    assert "(default: 64)" in help_text(capsys, ["translate", "--help"])
    assert "--budget {" + ",".join(BUDGETS) + "}" in help_text(capsys, ["curve", "--help"])
    with pytest.raises(SystemExit):
        main(["experiment", "table2", "c.yaml", "--budget", "cpu-smal"])
    assert "invalid choice: 'cpu-smal'" in capsys.readouterr().err


def test_a_mistyped_experiment_name_is_refused_with_a_suggestion(tiny_config, tmp_path, capsys):
    from mlas_lora.experiments.experiment import check_experiment_name

    out = tmp_path / "fresh"
    one_line_error(capsys, ["experiment", "tabel1", str(tiny_config), f"output_dir={out}"],
                   "unknown experiment 'tabel1'", "did you mean 'table1'", "table2", "--systems")  # fmt: skip
    assert not out.exists()
    one_line_error(capsys, ["experiment", "mine", str(tiny_config)], "unknown experiment 'mine'")
    check_experiment_name("mine", ["lora"], "configs/demo.yaml")  # a label of one's own, with --systems
    check_experiment_name("lr", None, "configs/sweeps/lr.yaml")  # a sweep file's own systems
    with pytest.raises(MlasLoraError, match="experiment name '..'"):
        check_experiment_name("..", ["lora"], "configs/demo.yaml")


def documented_experiment_lines() -> list[list[str]]:
    """Every `mlas-lora experiment NAME CONFIG ...` line of the README, docs/ and configs/."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "configs").rglob("*.yaml")]
    lines = []
    for path in files:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        lines += [
            m.split() for m in re.findall(r"mlas-lora experiment ([a-z0-9][\w.-]* \S+\.yaml[^\n`]*)", text)
        ]
    return lines


def test_every_documented_experiment_command_passes_the_name_check():
    from mlas_lora.experiments.experiment import check_experiment_name

    lines = documented_experiment_lines()
    assert any(words[0] == "lr" for words in lines), "the sweep files' own invocations are found"
    for words in lines:
        systems = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--systems"), None)
        check_experiment_name(words[0], systems and systems.split(","), words[1])


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"mlas-lora {version('mlas-lora')}\n"


def test_user_errors_are_one_line(tiny_config, tmp_path, capsys):
    one_line_error(capsys, ["experiment", "lambda", str(tiny_config), "--lambdas", "0.1,x"],
                   "--lambdas", "'x'")  # fmt: skip
    a_file = tmp_path / "somefile"
    a_file.write_text("x\n")
    for command in (["run"], ["train"], ["experiment", "table2"]):
        one_line_error(capsys, [*command, str(tiny_config), f"output_dir={a_file / 'run'}"], str(a_file))
    assert a_file.read_text() == "x\n"


def test_run_systems_runs_only_those_of_the_config(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_config), "--systems", "zero-shot", f"output_dir={out}"]) == 0
    rows = re.findall(r"^\| (\S+) \|", (out / "report.md").read_text(), flags=re.M)
    assert "zero-shot" in rows and "lora" not in rows and "mlas-lora" not in rows
    assert not list(out.glob("train-*")) and not list(out.glob("awareness-*"))
    one_line_error(capsys, ["run", str(tiny_config), "--systems", "zero-shot,lroa", f"output_dir={out}"],
                   "no system 'lroa'", "zero-shot, lora, mlas-lora")  # fmt: skip


def test_data_wordnet_prepares_metoers_wordnet_alone(tmp_path, capsys, monkeypatch):
    import mlas_lora.evaluation.meteor as meteor

    calls = []

    def prepare(from_dir=None):
        calls.append(from_dir)
        return tmp_path / "wordnet"

    monkeypatch.setattr(meteor, "prepare_wordnet", prepare)
    monkeypatch.setattr(meteor, "meteor_available", lambda: (False, "not there"))
    assert main(["data", "wordnet", "--from", str(tmp_path)]) == 0
    assert calls == [str(tmp_path)] and str(tmp_path / "wordnet") in capsys.readouterr().out
    monkeypatch.setattr(meteor, "meteor_available", lambda: (True, None))
    assert main(["data", "wordnet"]) == 0 and len(calls) == 1  # prepared already: nothing fetched
    assert "already prepared" in capsys.readouterr().out
    assert main(["data", "wordnet", "--force"]) == 0 and calls[-1] is None

    def offline(from_dir=None):
        raise MlasLoraError("apt-get download wordnet-base failed")

    monkeypatch.setattr(meteor, "prepare_wordnet", offline)
    one_line_error(capsys, ["data", "wordnet", "--force"], "apt-get download wordnet-base failed")


def test_a_missing_comet_checkpoint_is_an_error(tmp_path, capsys):
    text = tmp_path / "hyp.txt"
    text.write_text("the cat sat\n")
    scoring = ["evaluate", "--hyp", str(text), "--ref", str(text), "--lang", "en"]
    missing = str(tmp_path / "nonexistent")
    for extra in (["--metrics", "bleu"], ["--src", str(text)]):  # COMET left out, or asked for
        one_line_error(
            capsys,
            [*scoring, "--comet-model", missing, *extra],
            f"--comet-model {missing}: no COMET checkpoint",
        )
    one_line_error(capsys, [*scoring, "--comet-model", missing], "--src")  # what COMET needs first


def test_a_run_failing_on_its_student_leaves_no_folder(tiny_config, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    for command in ("run", "train"):
        code = main(
            [command, str(tiny_config), f"models.student={tmp_path / 'nonexistent'}", f"output_dir={fresh}"]
        )
        assert code == 2 and "nonexistent" in capsys.readouterr().err
        assert not fresh.exists(), command
