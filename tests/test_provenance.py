"""Provenance: the corpus's pinned package versions, the LICENSE, CITATION.cff and the models-and-data page."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mlas_lora.data import debian, embedded, pins, sources
from mlas_lora.data.catalogs import write_mo
from mlas_lora.data.embedded import build_corpus, corpus_stats
from mlas_lora.errors import MlasLoraError
from mlas_lora.models.registry import REGISTRY
from test_corpus_build import DE_PO, DE_UI, LO_DIR, make_deb

ROOT = Path(__file__).resolve().parents[1]
PIN = "4:7.4.7-1+deb12u14"
RECORDED = {  # the archives of the corpus on record (its manifest.json, built 2026-12-05)
    "libreoffice-l10n-cs": "2add67cb5f19009912e5b77c5f1c34807cc40889c12f4c25e9fbefb505c9d0c4",
    "libreoffice-l10n-de": "aee22c8e3b3c0431f6e1b0bc66f757ba36c860e2651a05eb050fde4897f06548",
    "libreoffice-l10n-et": "1e61b56414b179ae730b4cf728d4e99ad4373ee88a24ab351341b82dfdccd662",
    "libreoffice-l10n-fi": "0541c5d4254a0c22336319cdffe050672366f6f3abca96536367cc27fe7e8a03",
    "libreoffice-l10n-ru": "01aec00c0f12f13994df49a0f41b8955bc93de1abf27acb281bc19a4c8feeae7",
    "libreoffice-l10n-tr": "1dccb8236d6030601faeb27d886b3a6afa051ae6ce91366bccf7fe1891b9837a",
    "libreoffice-l10n-zh-cn": "06b2800923811a11ddadc9e1e09ef8bda2a89ba118470403b2f6a897152e0809",
    "django": "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00",
    "wagtail": "1e6ad5c7891a54efce1400e168298b5a2cc343b642cee89c31bf5ec30c98b26c",
}


def write_inputs(root: Path, lo_version: str, django: str) -> Path:
    """A from_dir with one LibreOffice .deb at `lo_version` and a Django wheel at `django`."""
    root.mkdir(parents=True)
    make_deb(
        root / "lo-de.deb", "libreoffice-l10n-de", lo_version, {LO_DIR.format("de", "sw.mo"): write_mo(DE_UI)}
    )
    with zipfile.ZipFile(root / f"django-{django}-py3-none-any.whl", "w") as wheel:
        wheel.writestr("django/conf/locale/de/LC_MESSAGES/django.po", DE_PO)
    return root


def test_the_pins_are_the_versions_of_the_corpus_on_record():
    assert pins.pinned_versions() == {"libreoffice-l10n-*": PIN, "django": "5.2.19", "wagtail": "8.0.1"}
    assert pins.pinned_version("libreoffice-l10n-zh-cn") == PIN and pins.pinned_version("Django") == "5.2.19"
    assert pins.pinned_version("de.po") is None and pins.pinned_version("webapp") is None


def test_an_off_pin_package_is_refused_in_one_line_unless_any_version(tmp_path, monkeypatch, capsys):
    from mlas_lora.cli import main

    inputs = write_inputs(tmp_path / "in", "4:7.5.1-1", "6.1.3")
    with pytest.raises(MlasLoraError) as err:
        build_corpus(("de",), from_dir=inputs, out_dir=tmp_path / "c", progress=False)
    message = str(err.value)
    assert message.startswith(f"django 6.1.3 (pinned 5.2.19); libreoffice-l10n-de 4:7.5.1-1 (pinned {PIN}): ")
    assert "--any-version" in message and "\n" not in message and not (tmp_path / "c").exists()

    manifest = build_corpus(
        ("de",), from_dir=inputs, out_dir=tmp_path / "c", progress=False, any_version=True
    )
    assert manifest["off_pin"] == [
        "django 6.1.3 (pinned 5.2.19)",
        f"libreoffice-l10n-de 4:7.5.1-1 (pinned {PIN})",
    ]
    assert "libreoffice-l10n-de 4:7.5.1-1 (lo-de.deb, sha256 " in corpus_stats(tmp_path / "c")
    assert f"NOT the pinned {PIN}" in corpus_stats(tmp_path / "c")

    monkeypatch.setenv("MLAS_LORA_HOME", str(tmp_path / "home"))
    assert main(["data", "build", "--from", str(inputs)]) == 2
    assert capsys.readouterr().err.startswith("mlas-lora: error: django 6.1.3 (pinned 5.2.19); ")
    assert not (tmp_path / "home" / "corpus").exists()
    assert main(["data", "build", "--from", str(inputs), "--any-version"]) == 0
    assert (tmp_path / "home" / "corpus" / "manifest.json").is_file()


def test_the_manifest_records_the_pins_outside_the_fingerprint(tmp_path):
    inputs = write_inputs(tmp_path / "in", PIN, "5.2.19")
    pinned = build_corpus(("de",), from_dir=inputs, out_dir=tmp_path / "a", progress=False)
    assert pinned["pins"] == pins.pinned_versions() and pinned["off_pin"] == []
    assert {s["package"]: s["version"] for s in pinned["sources"]} == {
        "libreoffice-l10n-de": PIN,
        "django": "5.2.19",
    }
    told = build_corpus(("de",), from_dir=inputs, out_dir=tmp_path / "b", progress=False, any_version=True)
    assert told["fingerprint"] == pinned["fingerprint"]


def test_the_corpus_on_record_keeps_its_fingerprint():
    """Its key is params + the archives' sha256, as before the pins: the running experiments keep their data."""
    params = dict(langs=["cs", "de", "et", "fi", "ru", "tr", "zh"], test_frac=0.1, dev_frac=0.14,
                  min_eval_words=4, ood_min_words=4, format=1)  # fmt: skip
    archives = [SimpleNamespace(sha256=h) for h in RECORDED.values()]
    expected = "91fc7e84344f39785e745ee516eed2e12d70fba0614de0044aff99a9490d5839"
    assert embedded._fingerprint(params, archives) == expected


class FakeApt:
    """apt-cache and apt-get as `debian._run` calls them; `offers` maps package -> the one version apt has."""

    def __init__(self, offers: dict[str, str]):
        self.offers, self.calls = offers, []

    def __call__(self, cmd, check, cwd=None):
        self.calls.append(cmd)
        specs = [c for c in cmd[1:] if not c.startswith("-") and c not in ("show", "download")]
        found = [s.partition("=") for s in specs]
        found = [(p, self.offers[p]) for p, _, v in found if p in self.offers and v in ("", self.offers[p])]
        if cmd[:2] == ["apt-get", "download"]:
            [(package, version)] = found
            make_deb(cwd / f"{package}_{version.replace(':', '%3a')}_all.deb", package, version, {})
            return subprocess.CompletedProcess(cmd, 0, "", "")
        blocks = [f"Package: {p}\nVersion: {v}\nSHA256: {'0' * 64}\n" for p, v in found]
        return subprocess.CompletedProcess(cmd, 0, "\n".join(blocks), "")


def fake_pip(calls: list, newest: dict[str, str]):
    def run(cmd, capture_output=True, text=True):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for spec in cmd[cmd.index("--no-deps") + 1 : cmd.index("-d")]:
            name, _, version = spec.partition("==")
            with zipfile.ZipFile(dest / f"{name}-{version or newest[name]}-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"{name}/locale/de/LC_MESSAGES/django.po", DE_PO)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


@pytest.fixture
def fake_fetch(monkeypatch):
    apt, pip_calls = FakeApt({"libreoffice-l10n-de": PIN, "libreoffice-l10n-zh-cn": PIN}), []
    monkeypatch.setattr(debian, "_run", apt)
    monkeypatch.setattr(debian, "apt_available", lambda: True)
    monkeypatch.setattr(sources.subprocess, "run", fake_pip(pip_calls, {"django": "6.1.3", "wagtail": "8.1"}))
    return apt, pip_calls


def test_fetch_asks_apt_and_pip_for_the_pinned_versions_then_reuses_them_offline(tmp_path, fake_fetch):
    apt, pip_calls = fake_fetch
    got = sources.fetch_sources(("de", "zh"), tmp_path / "dl")
    assert [(s.package, s.version) for s in got] == [
        ("libreoffice-l10n-de", PIN), ("libreoffice-l10n-zh-cn", PIN), ("django", "5.2.19"), ("wagtail", "8.0.1"),
    ]  # fmt: skip
    assert ["apt-get", "download", f"libreoffice-l10n-de={PIN}"] in apt.calls
    assert f"libreoffice-l10n-zh-cn={PIN}" in apt.calls[0]
    assert pip_calls[0][-4:] == ["django==5.2.19", "wagtail==8.0.1", "-d", str(tmp_path / "dl")]
    apt.calls.clear(), pip_calls.clear()
    assert sources.fetch_sources(("de", "zh"), tmp_path / "dl") == got
    assert apt.calls == [] and pip_calls == []


def test_any_version_fetches_what_apt_and_pip_offer(tmp_path, fake_fetch):
    apt, pip_calls = fake_fetch
    apt.offers["libreoffice-l10n-de"] = "4:7.5.1-1"
    got = sources.fetch_sources(("de",), tmp_path / "dl", any_version=True)
    assert [(s.package, s.version) for s in got] == [
        ("libreoffice-l10n-de", "4:7.5.1-1"), ("django", "6.1.3"), ("wagtail", "8.1"),
    ]  # fmt: skip
    assert ["apt-get", "download", "libreoffice-l10n-de"] in apt.calls
    assert pip_calls[0][-4:] == ["django", "wagtail", "-d", str(tmp_path / "dl")]


def test_a_pinned_version_apt_no_longer_offers_is_a_clear_error(tmp_path, fake_fetch):
    apt, _ = fake_fetch
    apt.offers["libreoffice-l10n-de"] = "4:7.4.7-1+deb12u15"
    with pytest.raises(MlasLoraError) as err:
        sources.fetch_sources(("de",), tmp_path / "dl")
    message = str(err.value)
    assert message.startswith(f"apt offers no libreoffice-l10n-de={PIN} (apt-cache show finds none); ")
    assert "--from DIR" in message and "--any-version" in message and "\n" not in message


# --- licence, citation, documentation ---------------------------------------------------------------


def test_license_is_the_apache_2_0_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The mlas-lora authors\n")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 200
    assert 'license = {text = "Apache-2.0"}' in (ROOT / "pyproject.toml").read_text()


def test_citation_cff_parses_and_names_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("MLAS-LoRA: Language-Aware Parameters Detection and LoRA-Based")
    assert [a["family-names"] for a in paper["authors"]] == ["Dong", "Li", "Liu", "Zhu", "Xiong"]
    assert (paper["year"], paper["start"], paper["end"]) == (2025, 15645, 15660)
    assert paper["url"] == "https://aclanthology.org/2025.acl-long.762/"
    assert "63rd Annual Meeting of the Association for Computational Linguistics" in paper["collection-title"]


def test_models_and_data_page_states_every_pin_and_sha256():
    """docs/models-and-data.md is written by hand: it must name what the code pins."""
    page = (ROOT / "docs" / "models-and-data.md").read_text()
    for spec in REGISTRY.values():
        assert (
            spec.sha256 in page
            and spec.hub_id in page
            and f"{spec.packages[0]}` … `{spec.packages[-1]}" in page
        )
    for package, version in pins.pinned_versions().items():
        assert f"`{package}` | `{version}`" in page
    assert all(sha in page for sha in RECORDED.values())
