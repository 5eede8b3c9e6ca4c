"""Scale-out: data-parallel scoring and training equal one process; an offloaded teacher scores as a
resident one.

The two-process tests start tests/dist_*_script.py under a launcher (gloo on CPU, one thread each)
and compare what every process ends with against the same computation in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_scoring_script
import dist_training_script
from mlas_lora.awareness.offload import saved_weights_on_host
from mlas_lora.awareness.scoring import AwarenessScores, load_awareness
from mlas_lora.cli import main, parse_max_memory
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.arch import decoder_layers
from mlas_lora.models.loading import load_model
from mlas_lora.testing.tiny import save_tiny
from test_pipeline import _write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
LAUNCH_TIMEOUT = 300


def launch(command: list[str]) -> str:
    """Run a launcher's command (2 processes on CPU, one thread each); its stdout, or fail with its output."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_scores(got: AwarenessScores, want: AwarenessScores) -> None:
    assert got.pairs == want.pairs and got.selected_layers == want.selected_layers
    assert (got.num_sentences, got.num_tokens, got.num_target_tokens) == (
        want.num_sentences,
        want.num_tokens,
        want.num_target_tokens,
    )
    assert got.relevance_by_reading.keys() == want.relevance_by_reading.keys()
    for name, relevance in want.relevance_by_reading.items():
        torch.testing.assert_close(got.relevance_by_reading[name], relevance, rtol=1e-5, atol=0)
    assert got.phi.keys() == want.phi.keys()
    for key, phi in want.phi.items():
        torch.testing.assert_close(got.phi[key], phi, rtol=1e-5, atol=1e-8)


def test_two_processes_score_as_one(tmp_path):
    """torch.distributed.run, 2 processes: each scores its shard of the 5 seed batches (3 / 2), and
    every process returns the summed scores, equal to one process scoring all of them."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launch([*launcher, str(TESTS / "dist_scoring_script.py"), str(tmp_path)])
    want = dist_scoring_script.score()
    for rank in (0, 1):
        folder = tmp_path / f"rank-{rank}"
        assert json.loads((folder / "world.json").read_text()) == {"rank": rank, "size": 2}
        assert_same_scores(load_awareness(folder), want)


def test_two_processes_train_as_one(tmp_path):
    """accelerate launch, 2 processes (DDP, gloo): the same global batch of routed micro-batches split
    2 + 1 over the processes, stopped after 2 steps and resumed to 4, ends with the adapters, loss
    history and per-pair losses of one process doing the same; the pair absent from every step stays
    bitwise as initialised; only the main process wrote checkpoints."""
    launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    launch([*launcher, str(TESTS / "dist_training_script.py"), str(tmp_path)])
    script = dist_training_script
    script.train(tmp_path / "one", stop_after=script.STOP)
    want, result = script.train(tmp_path / "one")
    initial = script.routed_student().lora_state_dict()
    steps = [f"step-{s:06d}" for s in range(1, script.CONFIG.max_steps + 1)]
    assert sorted(p.name for p in tmp_path.glob("saved-by-*")) == [f"saved-by-0-{s}" for s in steps]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == steps[-2:]
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank-{rank}.safetensors"))
        log = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert log["size"] == 2 and got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
            if ".specific.en-cs." in key:
                assert torch.equal(got[key], initial[key]), key
            else:
                assert not torch.equal(got[key], initial[key]), f"{key} did not train"
        assert [h["step"] for h in log["history"]] == [h["step"] for h in result.history]
        for field in ("loss", "lr"):
            assert [h[field] for h in log["history"]] == pytest.approx([h[field] for h in result.history])
        assert log["loss_per_pair"] == pytest.approx(result.loss_per_pair)


def tiny_config(tmp_path: Path) -> Path:
    """A tiny MLAS-LoRA config (corpus, teacher, student under tmp_path), output_dir tmp_path/two."""
    (tmp_path / "models").mkdir()
    _write_corpus(tmp_path / "corpus", ["en-de", "en-fi"])
    teacher = save_tiny(tmp_path / "models" / "teacher", role="teacher", seed=1)
    student = save_tiny(tmp_path / "models" / "student", role="student", seed=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
name: scale-out
output_dir: {tmp_path / "two"}
systems: [mlas-lora]
data: {{corpus: {tmp_path / "corpus"}, directions: [en-de, en-fi], seed_per_direction: 5}}
models: {{teacher: {teacher}, student: {student}, dtype: float32}}
awareness: {{batch_size: 2}}
lora: {{r_gen: 4, r_spe: 4}}
training: {{max_steps: 2, micro_batch: 3, grad_accum: 2, checkpoint_every: 1, lr: 1.0e-3}}
""")
    return config


def test_two_processes_run_the_train_command_as_one(tmp_path):
    """`mlas-lora train` under torch.distributed.run, 2 processes, on a tiny config: scoring, classes,
    transfer, training and export write the files of a one-process run, once (no leftovers of a
    second writer), with the same awareness scores and trained adapters."""
    config = tiny_config(tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = launch([*launcher, "-m", "mlas_lora.cli", "train", str(config)])
    assert out.count("mlas-lora: trained") == 1, out  # printed by the main process only
    assert main(["train", str(config), f"output_dir={tmp_path / 'one'}"]) == 0
    two, one = tmp_path / "two", tmp_path / "one"
    assert _files(two) == _files(one)
    tensors = [p for p in _files(one) if p.endswith(".safetensors")]
    assert any(p.startswith("awareness-") for p in tensors) and any("checkpoints" in p for p in tensors)
    for path in tensors:
        assert_same_tensors(two / path, one / path)


def assert_same_tensors(got_file: Path, want_file: Path) -> None:
    got, want = load_file(str(got_file)), load_file(str(want_file))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{want_file}: {key}")


def test_score_command_places_the_teacher_under_max_memory(tmp_path, monkeypatch):
    """`mlas-lora score --max-memory cpu=... --offload-folder DIR` scores a teacher with layers on disk
    and writes the scores of the resident teacher."""
    import mlas_lora.awareness.scoring as scoring

    config = tiny_config(tmp_path)
    resident, _ = load_model(tmp_path / "models" / "teacher", dtype="float32")
    budget = _budget(resident)
    placements, score_teacher = [], scoring.score_teacher

    def spy(model, *args, **kwargs):
        placements.append(getattr(model, "hf_device_map", None))
        return score_teacher(model, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_teacher", spy)
    assert main(["score", str(config), f"output_dir={tmp_path / 'one'}"]) == 0
    placed = [f"output_dir={tmp_path / 'placed'}", "--max-memory", f"cpu={budget // 1000}KB"]
    assert main(["score", str(config), *placed, "--offload-folder", str(tmp_path / "off")]) == 0
    assert placements[0] is None and "disk" in placements[1].values(), placements
    (want,) = (tmp_path / "one").glob("awareness-*/awareness.safetensors")
    (got,) = (tmp_path / "placed").glob("awareness-*/awareness.safetensors")
    assert_same_tensors(got, want)


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _budget(model) -> int:
    """Bytes that hold the embedding and about two and a half decoder layers of `model`."""
    embedding = sum(p.numel() * p.element_size() for p in model.get_input_embeddings().parameters())
    layer = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    return embedding + int(2.5 * layer)


def test_offloaded_teacher_scores_as_resident(tmp_path):
    """A max_memory that holds the embedding and two of the four layers: the other layers go to disk
    (their weights on `meta` between forwards), the taps still fire on them, activation gradients
    still flow through them, and the scores equal those of the teacher loaded whole."""
    save_tiny(tmp_path / "teacher", "qwen2", "teacher")
    resident, _ = load_model(tmp_path / "teacher", dtype="float32")
    offloaded, _ = load_model(
        tmp_path / "teacher",
        dtype="float32",
        max_memory={"cpu": _budget(resident)},
        offload_folder=tmp_path / "off",
    )
    placement = offloaded.hf_device_map
    assert {"cpu", "disk"} <= set(placement.values()), placement
    on_disk = [i for i in range(4) if placement.get(f"model.layers.{i}") == "disk"]
    assert on_disk and decoder_layers(offloaded)[on_disk[0]].mlp.up_proj.weight.device.type == "meta"
    got = dist_scoring_script.score(offloaded)
    assert all(got.phi[f"phi.{i}.down.in"].sum() > 0 for i in on_disk)
    assert_same_scores(got, dist_scoring_script.score(resident))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.gpu
def test_cpu_offloaded_teacher_on_a_gpu_scores_as_resident(tmp_path):
    """On a GPU, layers offloaded to CPU memory run on the GPU; the weights autograd saves for their
    backward go back to the CPU (`saved_weights_on_host`), and the scores equal those of the teacher
    resident on the GPU."""
    save_tiny(tmp_path / "teacher", "qwen2", "teacher")
    resident, _ = load_model(tmp_path / "teacher", dtype="float32", device="cuda")
    offloaded, _ = load_model(
        tmp_path / "teacher", dtype="float32", max_memory={0: _budget(resident), "cpu": "1GiB"}
    )
    assert "cpu" in set(map(str, offloaded.hf_device_map.values())), offloaded.hf_device_map
    with saved_weights_on_host(offloaded) as active:
        assert active
    got, want = dist_scoring_script.score(offloaded), dist_scoring_script.score(resident)
    assert_same_scores(got, want)


def test_max_memory_flag_is_parsed_for_accelerate():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    with pytest.raises(MlasLoraError, match="DEVICE=SIZE"):
        parse_max_memory("0:20GiB")
