"""Debian packages read in Python (ar archive -> control/data tarballs) and fetched with apt-get.

A `.deb` is an `ar` archive holding `debian-binary`, `control.tar.*` and `data.tar.*`. Reading it
with the stdlib means the corpus builder needs no dpkg, and works from a folder of `.deb` files
copied from another machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from mlas_lora.errors import MlasLoraError

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60


REFETCH = "download it again or remove it from the folder"
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)
"""What a damaged compressed tarball raises while it is read."""


def read_ar(data: bytes, name: str = "<ar>") -> dict[str, bytes]:
    """Members of an `ar` archive by name (the common format: 60-byte headers, even padding)."""
    if not data.startswith(AR_MAGIC):
        raise MlasLoraError(f"{name}: not an ar archive (a .deb starts with {AR_MAGIC!r}); {REFETCH}")
    members, at = {}, len(AR_MAGIC)
    while at + AR_HEADER_SIZE <= len(data):
        fields = _ar_fields(data[at : at + AR_HEADER_SIZE])
        if fields is None:
            raise MlasLoraError(f"{name}: corrupt ar member header at byte {at}; {REFETCH}")
        member, size = fields
        at += AR_HEADER_SIZE
        if at + size > len(data):
            raise MlasLoraError(
                f"{name}: truncated .deb (member {member} needs {size} bytes, the file ends "
                f"{len(data) - at} bytes into it); {REFETCH}"
            )
        members[member] = data[at : at + size]
        at += size + (size % 2)
    return members


def _ar_fields(header: bytes) -> tuple[str, int] | None:
    """(member name, size) of a 60-byte ar member header, or None if it is not one."""
    if header[58:60] != b"`\n":
        return None
    try:
        return header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58].decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def _reading(name: str, stem: str) -> Iterator[None]:
    """A damaged tarball inside a `.deb` as one error naming the file."""
    try:
        yield
    except ARCHIVE_ERRORS as err:
        raise MlasLoraError(
            f"{name}: corrupt .deb, cannot read its {stem}.tar member ({type(err).__name__}: {err}); {REFETCH}"
        ) from None


def write_ar(members: dict[str, bytes]) -> bytes:
    """An `ar` archive of `members` (used to build test `.deb` files)."""
    out = bytearray(AR_MAGIC)
    for name, body in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode("ascii")
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return bytes(out)


def _member_tar(members: dict[str, bytes], stem: str, name: str) -> tarfile.TarFile:
    for member, body in members.items():
        if member.startswith(stem + ".tar"):
            if member.endswith(".zst"):
                raise MlasLoraError(f"{name}: {member} is zstd-compressed, which the stdlib cannot read")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    raise MlasLoraError(f"{name}: no {stem}.tar.* member in the .deb (found {sorted(members)}); {REFETCH}")


def deb_control(path: Path) -> dict[str, str]:
    """The fields of a `.deb`'s control file (Package, Version, ...)."""
    members = read_ar(path.read_bytes(), str(path))
    with _reading(str(path), "control"), _member_tar(members, "control", str(path)) as tar:
        member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "control"), None)
        if member is None:
            raise MlasLoraError(f"{path}: control.tar has no control file; {REFETCH}")
        text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    return dict(_control_field(line) for line in text.splitlines() if line and not line[0].isspace())


def _control_field(line: str) -> tuple[str, str]:
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def deb_files(path: Path, suffix: str) -> Iterator[tuple[str, bytes]]:
    """(path inside the package, bytes) of every data file whose name ends with `suffix`."""
    members = read_ar(path.read_bytes(), str(path))
    with _reading(str(path), "data"), _member_tar(members, "data", str(path)) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(suffix):
                yield member.name, tar.extractfile(member).read()


def apt_available() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("apt-cache") is not None


def apt_download(packages: list[str], dest: Path, versions: dict[str, str] | None = None) -> list[Path]:
    """Download `.deb` files (no install) into `dest`, refreshing the package lists once if needed.

    `versions` pins packages to one version each (`apt-get download NAME=VERSION`); a pinned
    package's `.deb` already in `dest` is reused without asking apt, so a pinned rebuild works
    offline, and after the mirror has moved on. An unpinned one is reused when its sha256 matches
    the archive's.
    """
    versions = versions or {}
    cached = {p: _cached_version(dest, p, versions[p]) for p in packages if p in versions}
    wanted = [p for p in packages if cached.get(p) is None]
    if wanted and not apt_available():
        raise MlasLoraError(
            "apt-get is not available (not a Debian-like system): download the .deb files elsewhere "
            "and pass from_dir=DIR (CLI: --from-dir DIR)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    specs = {p: f"{p}={versions[p]}" if p in versions else p for p in wanted}
    info = _apt_show(list(specs.values())) if wanted else {}
    missing = [specs[p] for p in wanted if p not in info]
    if missing:
        raise MlasLoraError(f"apt offers no {', '.join(missing)} (apt-cache show finds none)")
    for package in wanted:
        reused = _cached_deb(dest, package, info[package].get("SHA256", ""))
        cached[package] = reused or _apt_get_download(package, specs[package], dest)
    return [cached[p] for p in packages]


def _cached_version(dest: Path, package: str, version: str) -> Path | None:
    """The `.deb` of `package` at `version` in `dest`, by the name `apt-get download` gives it."""
    hits = sorted(dest.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    return hits[0] if hits else None


def _apt_show(packages: list[str]) -> dict[str, dict[str, str]]:
    result = _run(["apt-cache", "show", "--no-all-versions", *packages], check=False)
    if result.returncode != 0 and os.geteuid() == 0:
        _run(["apt-get", "update"], check=True)  # a fresh container has no package lists yet
        result = _run(["apt-cache", "show", "--no-all-versions", *packages], check=False)
    if result.returncode != 0:
        raise MlasLoraError(f"apt-cache cannot find {', '.join(packages)}: {result.stderr.strip()[-300:]}")
    info = {}
    for block in result.stdout.strip().split("\n\n"):
        fields = dict(_control_field(line) for line in block.splitlines() if line and not line[0].isspace())
        info[fields.get("Package", "")] = fields
    return info


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_deb(dest: Path, package: str, sha256: str) -> Path | None:
    for path in sorted(dest.glob(f"{package}_*.deb")):
        if sha256 and file_sha256(path) == sha256:
            return path
    return None


def _apt_get_download(package: str, spec: str, dest: Path) -> Path:
    before = set(dest.glob(f"{package}_*.deb"))
    _run(["apt-get", "download", spec], check=True, cwd=dest)
    new = sorted(set(dest.glob(f"{package}_*.deb")) - before) or sorted(dest.glob(f"{package}_*.deb"))
    if not new:
        raise MlasLoraError(f"apt-get download {package} wrote no .deb file into {dest}")
    return new[-1]


def _run(cmd: list[str], check: bool, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if check and result.returncode != 0:
        raise MlasLoraError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-300:]}")
    return result
