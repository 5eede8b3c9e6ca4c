"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread; several threads spin against each other when the
    machine is shared (a 4x slowdown seen on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """The suite's exact comparisons are made on the CPU, as CI runs them. On a machine with a GPU,
    models would load onto it (`distributed.compute_device`) and the trainer's accelerator would pick
    it, so every test not marked `gpu` runs with ACCELERATE_USE_CPU=1; accelerate's process-wide
    state is reset around each test so that CPU and GPU tests can share one pytest process. Nothing
    changes where no GPU is visible."""
    if not torch.cuda.is_available():
        yield
        return
    from accelerate.state import AcceleratorState

    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
