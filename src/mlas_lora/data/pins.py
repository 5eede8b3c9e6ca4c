"""The exact package versions the embedded corpus is built from, and the check that enforces them.

A newer LibreOffice or Django ships other strings, so the train/dev/test/ood files (and every
score measured on them) would change under the same command. `data build` therefore fetches
these versions and refuses any other unless told (`--any-version`, `build_corpus(any_version=True)`).
The versions below are those of the corpus the published results were made on (built 2026-12-05 on
Debian 12 "bookworm" with Python 3.11; docs/models-and-data.md lists the archives' sha256).

Bumping a pin changes the corpus: its fingerprint, every run's data and thus every stage key.
"""

from __future__ import annotations

from collections.abc import Iterable

from mlas_lora.errors import MlasLoraError

LIBREOFFICE_L10N_PREFIX = "libreoffice-l10n-"
LIBREOFFICE_L10N = "4:7.4.7-1+deb12u14"
"""Debian version of every `libreoffice-l10n-<locale>` package (the in-domain train/dev/test text)."""

WHEELS = {"django": "5.2.19", "wagtail": "8.0.1"}
"""PyPI versions of the wheels whose `.po` catalogs give the out-of-domain test set. Pinned also
because pip picks by interpreter: Django 6 needs Python 3.12, so 3.11 and 3.12 fetch different text."""


def pinned_versions() -> dict[str, str]:
    """The pins as one mapping (`libreoffice-l10n-*` stands for every language package)."""
    return {f"{LIBREOFFICE_L10N_PREFIX}*": LIBREOFFICE_L10N, **WHEELS}


def pinned_version(package: str) -> str | None:
    """The version `package` is pinned to; None for a package the project does not pin (own files)."""
    if package.startswith(LIBREOFFICE_L10N_PREFIX):
        return LIBREOFFICE_L10N
    return WHEELS.get(package.lower())


def off_pin(packages: Iterable[tuple[str, str]]) -> list[str]:
    """`package version (pinned X)` for each (package, version) that is not at its pin."""
    found = []
    for package, version in packages:
        want = pinned_version(package)
        if want is not None and version != want:
            found.append(f"{package} {version} (pinned {want})")
    return found


def check_pins(packages: Iterable[tuple[str, str]], any_version: bool = False) -> list[str]:
    """The off-pin packages; an error naming them unless `any_version`."""
    found = off_pin(packages)
    if found and not any_version:
        raise MlasLoraError(
            f"{'; '.join(found)}: the embedded corpus is pinned to these versions "
            "(mlas_lora/data/pins.py) so that it matches the published results; build from the pinned "
            "files (--from DIR) or pass --any-version to build from these anyway (the corpus then differs)"
        )
    return found
