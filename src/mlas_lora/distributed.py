"""Data parallelism over the processes of `accelerate launch` (or `torch.distributed.run`).

Scoring shards the seed batches and training the micro-batches of each step over the processes;
sums are added up across them and only the main process writes files. A single process (no
launcher) is the default, and then nothing here touches `torch.distributed`: every helper is a
no-op, so one process computes and writes exactly what it did before data parallelism existed.

Under a launcher (WORLD_SIZE > 1 in the environment) the process group is set up once through
`accelerate.PartialState`, the state the trainer's `Accelerator` then shares: NCCL on GPUs, gloo
where no GPU is visible (so a CPU run needs no `--cpu` flag to be data-parallel).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def partial_state():
    """The shared `accelerate.PartialState` under a launcher (initialising the process group), else None."""
    if not launched() and not torch.distributed.is_initialized():
        return None
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu or not torch.cuda.is_available())


def rank_and_size() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) without a launcher."""
    state = partial_state()
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def is_main_process() -> bool:
    """Whether this process writes the files (process 0, or the only one)."""
    return rank_and_size()[0] == 0


def process_device() -> torch.device | None:
    """The device of this process under a launcher (its GPU, or the CPU); None without one."""
    state = partial_state()
    return None if state is None else state.device


def compute_device() -> torch.device:
    """Where this process computes: its launcher's device; alone, the first GPU where one is visible
    (CUDA_VISIBLE_DEVICES= or ACCELERATE_USE_CPU=1 keep it on the CPU), else the CPU."""
    if (device := process_device()) is not None:
        return device
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every size-th item from its index (all of them alone)."""
    rank, size = rank_and_size()
    return list(items[rank::size])


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its sum over all processes (in place); nothing to do alone.

    NCCL reduces GPU tensors and gloo CPU ones, so a tensor elsewhere travels through a copy.
    """
    if rank_and_size()[1] == 1:
        return
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    for tensor in tensors:
        work = tensor.to(device)
        torch.distributed.all_reduce(work)
        if work is not tensor:
            tensor.copy_(work)


def barrier() -> None:
    """Wait for every process (nothing to wait for alone)."""
    if rank_and_size()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (it may write a stage); the others then run it and
    find the stage done. Never around collective work such as scoring or training: the others
    would wait for the main process, which would wait for them."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()
