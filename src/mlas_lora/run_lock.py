"""One command at a time on a run folder: `RUN/.lock`, held by `run`, `experiment`, `train`, `export`,
`curve` and the teacher stages while they work there.

Two commands on one folder race on checkpoint folders and park or delete each other's trainings, so a
second one is refused with the holder's pid and command line. The lock is `flock` on `RUN/.lock`:
the kernel releases it when the holder exits or is killed, so a crash leaves no stale lock (the file
stays, holding the last holder's name, and means nothing by itself). Under a launcher (`accelerate
launch`, `torchrun`) the process of global rank 0 holds it for all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mlas_lora.errors import MlasLoraError

LOCK = ".lock"
RECORDS = ("config.yaml", "manifest.json")
"""What a command writes into the run folder before its first stage (experiments.run.write_manifest):
a fresh folder that holds no more when the command fails is removed, as if never made."""

_held: dict[Path, int] = {}
"""Run folders this process holds (resolved path -> depth): a command that runs another in the same
folder (an analysis running experiments) takes it again without refusing itself."""


def holder(run_dir: Path) -> str:
    """Who holds (or last held) the lock of `run_dir`, in words."""
    try:
        info = json.loads((Path(run_dir) / LOCK).read_text(encoding="utf-8"))
        return f"process {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold `run_dir`'s lock for the block; raise at once if another process holds it. A folder
    created for the lock alone is removed again if the block leaves nothing else in it, or only RECORDS
    when the block fails (a command that fails on its data or its models leaves no folder)."""
    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # a launcher's other processes: rank 0 holds it
        yield run_dir
        return
    key = run_dir.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield run_dir
        finally:
            _held[key] -= 1
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MlasLoraError(
                f"{run_dir} is in use by {holder(run_dir)}: wait for it to end, or stop it "
                "(two commands on one run folder would overwrite each other's work)"
            ) from None
        _write_holder(fd, command)
        _held[key] = 1
        failed = True
        try:
            yield run_dir
            failed = False
        finally:
            del _held[key]
            if created:
                _remove_if_unused(run_dir, failed)
    finally:
        os.close(fd)  # releases the flock


def _remove_if_unused(run_dir: Path, failed: bool) -> None:
    """Remove a folder this command created when it holds only the lock, or, the command having
    failed, the lock and RECORDS: nothing of the run's own work."""
    kept = {LOCK, *RECORDS} if failed else {LOCK}
    if {p.name for p in run_dir.iterdir()} <= kept:
        for name in kept:
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()


def _write_holder(fd: int, command: str | None) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    text = json.dumps({"pid": os.getpid(), "command": command, "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode("utf-8") + b"\n", 0)
