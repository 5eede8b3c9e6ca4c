"""The progress bars of every long step (downloads, scoring, transfer, training, translation): one
helper, so that a terminal, a log file and `--quiet` behave alike everywhere.

On a terminal, a tqdm bar redrawn in place. When stderr is not a terminal (a log file, `nohup`, CI),
tqdm would either redraw with carriage returns, which a log shows as one endless line, or (with
`disable=None`) print nothing, so a job of hours looks hung. There the same bar is written as plain
lines instead: one when it starts, one at most every LOG_INTERVAL seconds, one when it ends.
`--quiet` (`set_quiet`) turns every bar off, those of transformers and huggingface_hub included;
transformers' bars follow the same rules (`follow_transformers_bars`, which `load_model` calls).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LOG_INTERVAL = 30.0
"""Seconds between two lines of a bar written to a log (stderr not a terminal)."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """No progress bar at all (`mlas-lora --quiet`), or ours back on (`quiet=False`)."""
    global _quiet
    _quiet = quiet
    if quiet:  # huggingface_hub's (and transformers' < 5) read it when first imported: the CLI imports late
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def progress_bar(
    iterable=None, *, desc: str, total: int | None = None, unit: str = "it", show: bool = True, **options
) -> tqdm:
    """A tqdm bar on stderr (`options` are tqdm's): in place on a terminal, plain lines in a log, none
    under `--quiet` or when `show` is False (e.g. on all but the main process)."""
    if _quiet or not show:
        return tqdm(iterable, total=total, disable=True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, **options, **_stream_options())


def _stream_options() -> dict:
    """tqdm's options for stderr as it is now: a terminal, or a log (plain lines, ASCII bar)."""
    stream = sys.stderr
    if stream.isatty():
        return {"file": stream}
    return {"file": _Lines(stream), "ascii": True, "mininterval": LOG_INTERVAL, "maxinterval": LOG_INTERVAL}


def follow_transformers_bars() -> None:
    """Route transformers' own bars ("Loading weights") through the same rules (transformers >= 5
    has the hook; with an older one they stay as they are, off under `--quiet`)."""
    from transformers.utils import logging

    if hasattr(logging, "set_tqdm_hook"):
        logging.set_tqdm_hook(_transformers_bar)


def _transformers_bar(factory, args, kwargs):
    if not (isinstance(factory, type) and issubclass(factory, tqdm)) or kwargs.get("disable"):
        return factory(*args, **kwargs)  # transformers' EmptyTqdm: its bars are off already
    if _quiet:
        return factory(*args, **{**kwargs, "disable": True})
    return factory(*args, **{**kwargs, **_stream_options()})


class _Lines:
    """A stream for tqdm that writes its redraws ("\\r" + status + padding) as lines: the first at
    once, then the newest at most every LOG_INTERVAL seconds, and the last when the bar closes (its
    "\\n"). The throttle is here, not only in tqdm's `mininterval`, because `set_postfix` and
    `set_description` redraw at once whatever the interval."""

    def __init__(self, stream):
        self.stream, self.pending, self.last = stream, "", None

    def write(self, text: str) -> None:
        self.pending = text.replace("\r", "").rstrip() or self.pending
        now = time.monotonic()
        due = self.last is None or now - self.last >= LOG_INTERVAL or text.endswith("\n")
        if self.pending and due:
            self.stream.write(self.pending + "\n")
            self.pending, self.last = "", now

    def flush(self) -> None:
        self.stream.flush()
