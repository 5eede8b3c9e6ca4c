"""Finished cells carried between machines (experiments/cells.py): exported without corpus text, taken
back by a fresh run folder with `cells:` set, which then trains and translates nothing it has; a cell
whose segments changed, or whose archived file is damaged, is translated again."""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace

import pytest

from mlas_lora.cli import main
from mlas_lora.config import config_hash
from mlas_lora.experiments import run as run_module
from mlas_lora.experiments.cells import SUFFIX, Exported, export_cells
from mlas_lora.experiments.config import ExperimentConfig
from mlas_lora.experiments.data import load_splits
from mlas_lora.experiments.pipeline import train_key
from mlas_lora.experiments.run import HypothesisStore, run_experiment, system_key
from mlas_lora.experiments.systems import resolve_system
from test_hardening import set_test_line, zero_shot
from test_pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def cell_files(run) -> dict[str, str]:
    """Every hypothesis file of a run, by its path under hyps/, as text."""
    root = run / "hyps"
    return {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.jsonl"))
    }


def archive_bytes(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(f"*{SUFFIX}"))}


def outputs(run) -> dict[str, str]:
    """What a run reports: its results and significance files."""
    return {
        p.relative_to(run).as_posix(): p.read_text()
        for p in [*sorted((run / "results").glob("*.json")), run / "significance.json"]
    }


def record_translations(monkeypatch) -> list[str]:
    """The sources every later `translate` call (prompting and trained systems alike) is given."""
    seen: list[str] = []
    real = run_module.translate

    def recording(model, tokenizer, requests, *args, **kwargs):
        seen.extend(r.source for r in requests)
        return real(model, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(run_module, "translate", recording)
    monkeypatch.setattr("mlas_lora.translation.generate.translate", recording)
    return seen


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """A tiny run of zero-shot, LoRA and MLAS-LoRA, its cells exported, then the run folder deleted and
    the run made again from the archive: (config, root, first run's files, first run's outputs)."""
    root = tmp_path_factory.mktemp("cells")
    config = tiny_config(root)
    run = root / "run"
    run_experiment(config)
    first = cell_files(run), outputs(run)
    assert export_cells(run, root / "cells").written == len(first[0]) == 3 * 2 * 2  # systems, splits, pairs
    shutil.rmtree(run)
    report = run_experiment(replace(config, cells=str(root / "cells")))
    return config, root, first, report


def test_a_fresh_run_folder_takes_every_cell_and_trains_nothing(carried):
    """The second session's run: no teacher stage, no training, no export; the same hypothesis files
    (headers with their first seconds and keys) and the same results; check_stages finds no stage
    missing to complain of."""
    _, root, (files, scores), report = carried
    run = root / "run"
    made = {p.name.split("-")[0] for p in run.iterdir() if p.is_dir()}
    assert made == {"hyps", "results", "figures"}, made
    assert cell_files(run) == files
    assert outputs(run) == scores
    timings = report.read_text().split("## Wall time")[1].splitlines()
    for system in ("zero-shot", "lora", "mlas-lora"):
        (line,) = [line for line in timings if line.startswith(f"| {system} |")]
        assert line.endswith("| cached from an earlier run |"), line


def test_exported_cells_hold_no_corpus_text(carried):
    config, root, (files, _), _ = carried
    raw = b"".join(gzip.decompress(data) for data in archive_bytes(root / "cells").values())
    splits = load_splits(config.data, ("valid", "test"))
    examples = [e for split in (splits.valid, splits.test) for ex in split.values() for e in ex]
    texts = {text for e in examples for text in (e.source, e.reference)}
    assert texts and all(text in "".join(files.values()) for text in texts)  # the run files hold them
    assert [text for text in texts if text.encode("utf-8") in raw] == []
    rows = [r for path in (root / "run" / "hyps").rglob("*.jsonl") for r in HypothesisStore._rows(path)[1:]]
    hyps = [r["hypothesis"] for r in rows]
    assert all(h.encode("utf-8") in raw for h in hyps if h)  # what the archive is for is there


def test_export_again_is_the_same_bytes(carried, capsys):
    """Exported again, and exported from the run folder made from the archive: byte for byte the same
    files (gzip without a timestamp), none written; the command prints one line saying so."""
    _, root, (files, _), _ = carried
    before = archive_bytes(root / "cells")
    assert all(data[4:8] == b"\0\0\0\0" for data in before.values())  # gzip's mtime field
    assert main(["cells", "export", str(root / "run"), "--out", str(root / "cells")]) == 0
    line = capsys.readouterr().out
    size = sum(len(data) for data in before.values())
    assert line == (
        f"{root / 'cells'}: 0 cell(s) written, {len(files)} unchanged, {size:,} bytes in all "
        f"(from {root / 'run' / 'hyps'})\n"
    )
    assert archive_bytes(root / "cells") == before
    assert export_cells(root / "run", root / "again") == Exported(written=len(files), size=size)
    assert archive_bytes(root / "again") == before


def test_the_archive_changes_no_key_or_config_hash():
    """`cells` says where finished cells lie: golden hashes of the default config (taken before the
    field existed) and every key stay as they are."""
    config, carried_to = ExperimentConfig(), ExperimentConfig(cells="results/cells/x")
    assert config_hash(config) == config_hash(carried_to) == "c3bc9cf129e659d8"
    assert config_hash(config.key_tree()) == config_hash(carried_to.key_tree()) == "afc689ab39c3fd6e"
    for name in ("zero-shot", "lora", "mlas-lora"):
        one, other = resolve_system(name, config), resolve_system(name, carried_to)
        assert system_key(one) == system_key(other)
        if one.method.trains:
            assert train_key(one) == train_key(other)
    assert ExperimentConfig(cells="~/cells").cells.startswith("/")


def carried_zero_shot(root):
    """The zero-shot config of `root`, run, its cells exported to root/cells and its run folder gone:
    (config with `cells` set, the first run's files)."""
    config = zero_shot(root)
    run_experiment(config)
    files = cell_files(root / "run")
    export_cells(root / "run", root / "cells")
    shutil.rmtree(root / "run")
    return replace(config, cells=str(root / "cells")), files


def test_an_edited_test_reference_translates_that_cell_again(tmp_path, monkeypatch):
    config, files = carried_zero_shot(tmp_path)
    source = "open file save close 200"
    set_test_line(tmp_path, "en-de", f"{source}\tOFFEN DATEI SPEICHERN SCHLIESSEN 200 (neu)")
    translated = record_translations(monkeypatch)
    run_experiment(config)
    examples = load_splits(config.data, ("test",)).test["en-de"]
    assert translated == [e.source for e in examples] and examples[0].source == source
    now = cell_files(tmp_path / "run")
    edited = "zero-shot/test.en-de.jsonl"
    assert {name: text for name, text in now.items() if name != edited} == {
        name: text for name, text in files.items() if name != edited
    }
    assert "(neu)" in now[edited] and "(neu)" not in files[edited]


def test_a_damaged_archived_cell_is_translated_again(tmp_path, monkeypatch):
    """A cut file, one that is not gzip and one without its fields: those cells are translated again,
    the rest taken."""
    config, files = carried_zero_shot(tmp_path)
    folder = tmp_path / "cells" / "zero-shot"
    cut = folder / f"test.en-de{SUFFIX}"
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    (folder / f"test.en-fi{SUFFIX}").write_bytes(b"not gzip")
    (folder / f"valid.en-fi{SUFFIX}").write_bytes(gzip.compress(b'{"format": "mlas-lora-cell/1"}'))
    translated = record_translations(monkeypatch)
    run_experiment(config)
    splits = load_splits(config.data, ("valid", "test"))
    again = [*splits.test["en-de"], *splits.test["en-fi"], *splits.valid["en-fi"]]
    assert sorted(translated) == sorted(e.source for e in again)
    now = cell_files(tmp_path / "run")
    assert now.keys() == files.keys()
    for name, text in files.items():  # the same hypotheses; a cell translated again has its own seconds
        assert now[name].split("\n")[1:] == text.split("\n")[1:], name


def test_force_takes_nothing_from_the_archive(tmp_path, monkeypatch):
    config, files = carried_zero_shot(tmp_path)
    translated = record_translations(monkeypatch)
    run_experiment(config, force=True)
    assert len(translated) == sum(text.count("\n") - 1 for text in files.values())


def test_another_name_of_an_archived_function_takes_its_cells(carried, monkeypatch):
    """R-i is `lora` under another name (one content key): a fresh run folder of R-i alone copies the
    archived LoRA cells, as it would copy a LoRA file of its own run folder, and trains nothing."""
    config, root, _, _ = carried
    run = root / "run-r-i"
    translated = record_translations(monkeypatch)
    run_experiment(replace(config, systems=["R-i"], output_dir=str(run), cells=str(root / "cells")))
    assert translated == [] and not list(run.glob("train-*"))
    assert len(cell_files(run)) == 2 * 2  # splits, pairs
    for name in cell_files(run):
        header, *rows = HypothesisStore._rows(run / "hyps" / name)
        assert name.startswith("R-i/") and header["copied_from"] == "lora"
        assert rows == HypothesisStore._rows(root / "run" / "hyps" / name.replace("R-i/", "lora/"))[1:]
