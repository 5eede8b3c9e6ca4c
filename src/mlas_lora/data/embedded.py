"""The embedded corpus: English <-> {cs,de,et,fi,ru,tr,zh} pairs built from UI translation catalogs.

The paper trains and evaluates on WMT/FLORES; neither is reachable offline, so the project builds
its own parallel corpus from software localisation catalogs that Debian and PyPI serve:
LibreOffice's UI strings give train/dev/test (dev is the paper's "seed sentences" set for
awareness scoring), and Django/Wagtail strings give an out-of-domain test set, the analogue of
the paper's FLORES check.

Layout under `corpus_dir()`: `manifest.json` and `<lang>/<split>.jsonl` for split in
train/dev/test/ood, one `{"translation": {"en": ..., "<lang>": ...}}` per line (the Hugging Face
translation layout, so `read_jsonl` reads them too). Each language is stored once; `xx-en` reads
the `en-xx` pairs reversed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from mlas_lora.data.cleaning import clean_pair, english_words, pick_translations, split_of, unit_hash
from mlas_lora.data.debian import apt_available
from mlas_lora.data.lines import jsonl_rows
from mlas_lora.data.pins import check_pins, pinned_version, pinned_versions
from mlas_lora.data.records import Example
from mlas_lora.data.sources import SourceFile, fetch_sources, find_sources, read_messages
from mlas_lora.errors import MlasLoraError
from mlas_lora.languages import PAPER_LANGUAGES, Direction, language_name
from mlas_lora.paths import corpus_dir, downloads_dir
from mlas_lora.progress import progress_bar
from mlas_lora.stage_files import json_line

SPLITS = ("train", "dev", "test", "ood")
FORMAT_VERSION = 1  # bump when cleaning or split rules change, so existing corpora are rebuilt
PIVOT = "en"


def build_corpus(
    langs: tuple[str, ...] = PAPER_LANGUAGES,
    from_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
    test_frac: float = 0.10,
    dev_frac: float = 0.14,
    min_eval_words: int = 4,
    ood_min_words: int = 4,
    progress: bool = True,
    any_version: bool = False,
) -> dict:
    """Build (or reuse) the corpus and return its manifest.

    `test_frac`/`dev_frac` are shares of the English strings with at least `min_eval_words`
    words (shorter strings always train). Without `from_dir`, packages are fetched with
    apt-get and pip into `downloads_dir()`. An unchanged build (same inputs and parameters)
    is skipped unless `force`. LibreOffice, Django and Wagtail packages must be at the versions
    pinned in `pins.py` unless `any_version` (own `.mo`/`.po` files and other wheels are not pinned).
    """
    langs = _check_langs(langs)
    out = Path(out_dir) if out_dir else corpus_dir()
    params = dict(
        langs=list(langs),
        test_frac=test_frac,
        dev_frac=dev_frac,
        min_eval_words=min_eval_words,
        ood_min_words=ood_min_words,
        format=FORMAT_VERSION,
    )
    sources = _gather_sources(langs, from_dir, refresh=force, any_version=any_version)
    off_pin = check_pins([(s.package, s.version) for s in sources], any_version)
    fingerprint = _fingerprint(params, sources)
    old = read_corpus_manifest(out) if (out / "manifest.json").exists() else None
    if old and old.get("fingerprint") == fingerprint and not force:
        return old
    ui, ood = _read_pairs(sources, langs, progress)
    if not any(ui.values()):
        raise MlasLoraError(
            f"{from_dir or downloads_dir()}: the {len(sources)} file(s) read give no in-domain translation "
            f"pair for {', '.join(langs)} (train, dev and test come from LibreOffice UI catalogs): add the "
            "libreoffice-l10n-<lang> .deb files (or <lang>.mo catalogs) of these languages and build again"
        )
    splits = _split_all(ui, ood, params)
    manifest = _manifest(params, sources, fingerprint, splits, off_pin)
    _write_atomically(out, splits, manifest)
    return manifest


def _check_langs(langs) -> tuple[str, ...]:
    for lang in langs:
        language_name(lang)  # an unknown code raises, named
    if PIVOT in langs or not langs:
        raise MlasLoraError(
            f"langs must be non-English language codes paired with {PIVOT!r}, got {list(langs)}"
        )
    return tuple(langs)


def _gather_sources(langs, from_dir, refresh: bool, any_version: bool) -> list[SourceFile]:
    if from_dir is not None:
        return find_sources(Path(from_dir))
    if not apt_available():
        raise MlasLoraError(
            "apt-get is not available (not a Debian-like system), so the LibreOffice packages cannot be "
            "fetched: download libreoffice-l10n-* .deb files and the django/wagtail wheels elsewhere and "
            "pass from_dir=DIR (CLI: mlas-lora data build --from-dir DIR)"
        )
    return fetch_sources(langs, downloads_dir(), refresh=refresh, any_version=any_version)


def _fingerprint(params: dict, sources: list[SourceFile]) -> str:
    text = json.dumps([params, sorted(s.sha256 for s in sources)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_pairs(sources, langs, progress: bool) -> tuple[dict, dict]:
    """Cleaned (English, translation) pairs per language, for the UI and the OOD domain."""
    pairs: dict[str, dict[str, list]] = {"ui": {x: [] for x in langs}, "ood": {x: [] for x in langs}}
    for source in progress_bar(sources, desc="catalogs", unit="pkg", show=progress):
        for lang, messages in read_messages(source, langs).items():
            underscore = source.domain == "ui"  # GTK `_` mnemonics appear in LibreOffice only
            cleaned = (clean_pair(m.source, m.translation, underscore) for m in messages)
            pairs[source.domain][lang].extend(p for p in cleaned if p)
    ui = {x: pick_translations(pairs["ui"][x]) for x in langs}
    ood = {x: pick_translations(pairs["ood"][x]) for x in langs}
    return ui, ood


def _split_all(ui: dict, ood: dict, params: dict) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Split every language by its English side; OOD drops any English string seen in the UI data.

    Pairs are ordered by a hash of the English string: shuffled, yet reproducible.
    """
    seen_ui = set().union(*(set(pairs) for pairs in ui.values()))
    splits = {}
    for lang in ui:
        by_split = {s: [] for s in SPLITS}
        for en, xx in ui[lang].items():
            split = split_of(en, params["test_frac"], params["dev_frac"], params["min_eval_words"])
            by_split[split].append((en, xx))
        for en, xx in ood[lang].items():
            if en not in seen_ui and english_words(en) >= params["ood_min_words"]:
                by_split["ood"].append((en, xx))
        splits[lang] = {s: sorted(p, key=lambda pair: unit_hash(pair[0])) for s, p in by_split.items()}
    return splits


def _manifest(params, sources, fingerprint, splits, off_pin: list[str]) -> dict:
    """What was built from what: `sources` name each input's package, version and sha256; `pins` and
    `off_pin` (the inputs built with `any_version` away from their pin) are provenance only, outside
    the fingerprint, so a corpus built before they were recorded keeps its key."""
    return {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "params": params,
        "sources": [s.to_dict() for s in sources],
        "pins": pinned_versions(),
        "off_pin": off_pin,
        "counts": {x: {s: len(p) for s, p in by_split.items()} for x, by_split in splits.items()},
        "english_overlap": english_overlap(
            {s: {en for by_split in splits.values() for en, _ in by_split[s]} for s in SPLITS}
        ),
    }


def _pin_note(source: dict) -> str:
    want = pinned_version(source["package"])
    return f" NOT the pinned {want}" if want is not None and source["version"] != want else ""


def english_overlap(english: dict[str, set[str]]) -> dict[str, int]:
    """Number of English strings each pair of splits shares (all must be 0)."""
    return {f"{a}/{b}": len(english[a] & english[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :]}


def _write_atomically(out: Path, splits: dict, manifest: dict) -> None:
    """Write into a sibling temp folder, then swap it in, so a failure leaves no half corpus."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (
        out.with_name(f".{out.name}.tmp-{os.getpid()}"),
        out.with_name(f".{out.name}.old-{os.getpid()}"),
    )
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for lang, by_split in splits.items():
            (tmp / lang).mkdir(parents=True)
            for split, pairs in by_split.items():
                lines = (json_line({"translation": {PIVOT: en, lang: xx}}) for en, xx in pairs)
                (tmp / lang / f"{split}.jsonl").write_text(
                    "".join(line + "\n" for line in lines), encoding="utf-8"
                )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_corpus_manifest(out_dir: str | Path | None = None) -> dict:
    """The manifest of the embedded corpus built by `build_corpus` (params, sources, counts)."""
    path = Path(out_dir or corpus_dir()) / "manifest.json"
    if not path.exists():
        raise MlasLoraError(f"no embedded corpus at {path.parent}: build it with `mlas-lora data build`")
    return json.loads(path.read_text())


def _split_path(out: Path, lang: str, split: str) -> Path:
    if split not in SPLITS:
        raise MlasLoraError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return out / lang / f"{split}.jsonl"


REBUILD = "rebuild the corpus with `mlas-lora data build --force`"


def _read_pairs_file(path: Path, lang: str) -> list[tuple[str, str]]:
    if not path.exists():
        raise MlasLoraError(f"no embedded corpus file {path}: build it with `mlas-lora data build`")
    pairs = []
    for lineno, row in jsonl_rows(path, REBUILD):
        pair = row.get("translation") if isinstance(row, dict) else None
        if not isinstance(pair, dict) or not all(isinstance(pair.get(x), str) for x in (PIVOT, lang)):
            raise MlasLoraError(
                f'{path}, line {lineno}: expected {{"translation": {{"{PIVOT}": ..., "{lang}": ...}}}}; {REBUILD}'
            )
        pairs.append((pair[PIVOT], pair[lang]))
    return pairs


def load_embedded(
    direction: str | Direction,
    split: str,
    limit: int | None = None,
    min_words: int = 0,
    seed: int = 0,
    out_dir: str | Path | None = None,
) -> list[Example]:
    """Examples of one direction and split; `xx-en` is `en-xx` reversed.

    `min_words` keeps pairs whose English side has at least that many words. `limit` keeps a
    deterministic subset chosen by a seeded hash of the English string, so for one seed every
    direction gets the same English sentences and a larger limit extends a smaller one.
    """
    d = direction if isinstance(direction, Direction) else Direction.parse(direction)
    if PIVOT not in (d.src, d.tgt):
        raise MlasLoraError(f"the embedded corpus pairs every language with English; {d} has no English side")
    lang = d.tgt if d.src == PIVOT else d.src
    pairs = _read_pairs_file(_split_path(Path(out_dir or corpus_dir()), lang, split), lang)
    pairs = [p for p in pairs if english_words(p[0]) >= min_words]
    if limit is not None and limit < len(pairs):
        chosen = set(
            sorted(range(len(pairs)), key=lambda i: unit_hash(pairs[i][0], f"subset-{seed}"))[:limit]
        )
        pairs = [p for i, p in enumerate(pairs) if i in chosen]
    if d.src == PIVOT:
        return [Example(PIVOT, lang, en, xx) for en, xx in pairs]
    return [Example(lang, PIVOT, xx, en) for en, xx in pairs]


def embedded_available(langs: tuple[str, ...] = PAPER_LANGUAGES, out_dir: str | Path | None = None) -> bool:
    """True when the corpus manifest and every split file of `langs` exist."""
    out = Path(out_dir or corpus_dir())
    files = [_split_path(out, x, s) for x in langs for s in SPLITS]
    return (out / "manifest.json").exists() and all(f.exists() for f in files)


def corpus_stats(out_dir: str | Path | None = None) -> str:
    """A printable table: pairs per language and split, the source packages, and the overlap check.

    Counts and overlaps are recomputed from the split files, not copied from the manifest, so the
    table checks what is on disk.
    """
    out = Path(out_dir or corpus_dir())
    manifest = read_corpus_manifest(out)
    langs = manifest["params"]["langs"]
    english: dict[str, set[str]] = {s: set() for s in SPLITS}
    rows = [f"{'lang':<6}" + "".join(f"{s:>8}" for s in SPLITS)]
    totals = dict.fromkeys(SPLITS, 0)
    for lang in langs:
        counts = []
        for split in SPLITS:
            pairs = _read_pairs_file(_split_path(out, lang, split), lang)
            english[split].update(en for en, _ in pairs)
            counts.append(len(pairs))
            totals[split] += len(pairs)
        rows.append(f"{lang:<6}" + "".join(f"{n:>8}" for n in counts))
    rows.append(f"{'total':<6}" + "".join(f"{totals[s]:>8}" for s in SPLITS))
    rows.append(f"directions: {2 * len(langs)} ({', '.join(f'en-{x}' for x in langs)} and reversed)")
    rows.append("sources:")
    rows += [
        f"  {s['package']} {s['version']} ({s['path']}, sha256 {s['sha256'][:12]}){_pin_note(s)}"
        for s in manifest["sources"]
    ]
    overlap = english_overlap(english)
    verdict = "ok" if not any(overlap.values()) else "FAILED"
    rows.append(f"English strings shared between splits: {overlap} -> {verdict}")
    return "\n".join(rows)
