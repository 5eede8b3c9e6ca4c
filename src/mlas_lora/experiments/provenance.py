"""`provenance.json`: what produced an experiment folder's tables, recorded when the experiment runs.

The command line, the code's git commit (and whether the tree had uncommitted changes), the dates,
the budget, the seeds, the data sizes, the decoding and the whole resolved config. The run folder's
`config.yaml` is rewritten by every later command on that run; this file stays with the tables it
describes, so `mlas-lora report` (publish.py) can print it beside every table it publishes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from mlas_lora.config import config_hash, to_dict
from mlas_lora.stage_files import read_small_json, write_json_atomic

PROVENANCE = "provenance.json"
FORMAT, VERSION = "mlas-lora-provenance", 1
DATA_SIZES = (
    "train_per_direction",
    "seed_per_direction",
    "valid_per_direction",
    "test_per_direction",
    "ood_per_direction",
)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def command_line(argv: list[str] | None) -> str | None:
    """`mlas-lora ARGS` as a shell would take it back (None: called from Python, not the CLI)."""
    return None if argv is None else shlex.join(["mlas-lora", *argv])


def code_commit(where: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git tree this package's source lies in: dirty when a tracked file
    differs from the commit. (None, None) outside a git tree (an installed wheel) or without git."""
    here = str(where or Path(__file__).resolve().parent)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)


def decoding_words(generation: dict) -> str:
    """The decoding settings in words, e.g. `greedy, max_new_tokens 256 (2.0 x source + 8), batch 64`."""
    beams = generation.get("num_beams", 1)
    search = "greedy" if beams == 1 else f"beam search ({beams} beams)"
    chat = {True: "on", False: "off"}.get(generation.get("chat"), "if the tokenizer has one")
    return (
        f"{search}, max_new_tokens {generation.get('max_new_tokens')} (at most "
        f"{generation.get('length_ratio')} x source tokens + {generation.get('length_margin')}), batch "
        f"{generation.get('batch_size')}, chat template {chat}, precision {generation.get('precision')}"
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def experiment_provenance(
    config,
    name: str,
    budget: str | None,
    seeds: int,
    command: str | None,
    started: str,
) -> dict:
    """The provenance of an experiment that ran under `config` (budget and overrides applied)."""
    commit, dirty = code_commit()
    generation = to_dict(config.generation)
    return {
        "format": FORMAT,
        "version": VERSION,
        "experiment": name,
        "command": command,
        "commit": commit,
        "dirty": dirty,
        "started": started,
        "finished": now(),
        "budget": budget,
        "seeds": seeds,
        "config_name": config.name,
        "config_hash": config_hash(config),
        "models": to_dict(config.models),
        "data": {
            "directions": list(config.data.directions),
            **{k: getattr(config.data, k) for k in DATA_SIZES},
        },
        "generation": {**generation, "decoding": decoding_words(generation)},
        "versions": {
            "python": sys.version.split()[0],
            **{p: _version(p) for p in ("mlas-lora", "torch", "transformers", "sacrebleu")},
        },
        "config": to_dict(config),
    }


def write_provenance(folder: Path, provenance: dict) -> Path:
    return write_json_atomic(Path(folder) / PROVENANCE, provenance)


def read_provenance(folder: Path) -> dict | None:
    """An experiment folder's provenance; None when it has none (made before it was recorded)."""
    found = read_small_json(Path(folder) / PROVENANCE)
    return found if isinstance(found, dict) and found.get("format") == FORMAT else None
