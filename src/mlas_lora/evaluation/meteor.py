"""METEOR (Banerjee & Lavie, 2005; NLTK's implementation) and the WordNet 3.0 it needs, built offline.

NLTK's METEOR aligns hypothesis and reference words in three stages: exact match, Porter stem match,
WordNet synonym match. WordNet is not downloaded through NLTK (it must never reach the network);
`prepare_wordnet` builds an NLTK WordNet data directory from Debian's `wordnet-base` and
`wordnet-sense-index` packages (WordNet 3.0), fetched with `apt-get download` or given as files.

Language caveat: the stemmer (Porter) and the synonyms (WordNet) are English. For other targets
only the exact-match stage is meaningful, so METEOR there is close to a unigram F-mean with a
fragmentation penalty; treat it as a secondary metric except for X->en. Tokens are whitespace
tokens, except for targets written without spaces (`languages.UNSPACED`: Chinese, Japanese, Thai...),
where each non-space character is a token.

Corpus METEOR is the mean of segment scores, times 100 (the scale of BLEU and chrF++).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from mlas_lora.data import debian
from mlas_lora.errors import MlasLoraError
from mlas_lora.evaluation.result import MetricResult, check_segments, unavailable
from mlas_lora.languages import UNSPACED
from mlas_lora.paths import cache_home, downloads_dir

DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
DEBIAN_WORDNET_DIR = "usr/share/wordnet/"
# The files NLTK's WordNetCorpusReader opens; all but `lexnames` ship under DEBIAN_WORDNET_DIR.
WORDNET_FILES = (
    "cntlist.rev",
    "index.sense",
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("adj", "adv", "noun", "verb")),
    *(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")),
)
ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5  # NLTK's defaults (Lavie & Agarwal, 2007)

# WordNet 3.0 lexicographer files, as documented in lexnames(5WN): number, name, syntactic category
# (1 noun, 2 verb, 3 adjective, 4 adverb). Debian does not ship the `lexnames` file NLTK reads.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def wordnet_dir() -> Path:
    """Where WordNet lives, laid out as an NLTK data dir: cache_home()/nltk_data/corpora/wordnet."""
    return nltk_data_dir() / "corpora" / "wordnet"


def lexnames_text() -> str:
    """The 45-line `lexnames` file: "NN<TAB>name<TAB>category"."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def meteor_available() -> tuple[bool, str | None]:
    """Whether METEOR can run (WordNet prepared), and if not, why and how to fix it."""
    root = wordnet_dir()
    missing = [f for f in (*WORDNET_FILES, "lexnames") if not (root / f).is_file()]
    if not missing:
        return True, None
    return False, (
        f"WordNet 3.0 not found in {root} (missing {', '.join(missing[:3])}"
        f"{', ...' if len(missing) > 3 else ''}); run `mlas-lora data wordnet`"
    )


def deb_files(deb: Path) -> dict[str, bytes]:
    """Regular files inside a .deb's data.tar.*, keyed by path without the leading './'."""
    return {name.removeprefix("./"): data for name, data in debian.deb_files(deb, "")}


def check_lexnames(man_page: bytes | None) -> None:
    """Cross-check LEXNAMES against the lexnames(5WN) man page shipped in wordnet-base, when present."""
    if man_page is None:
        return
    documented = re.findall(r"^(\d\d)\t(\S+)", gzip.decompress(man_page).decode(), flags=re.M)
    if [name for _, name in documented] != LEXNAMES:
        raise MlasLoraError("the lexnames(5WN) man page in wordnet-base disagrees with LEXNAMES")


def download_debs(dest: Path) -> list[Path]:
    """`apt-get download` the WordNet packages into dest (reusing cached .debs whose sha256 matches)."""
    return debian.apt_download(list(DEBIAN_PACKAGES), dest)


def find_debs(folder: Path) -> list[Path]:
    """The newest .deb of each WordNet package in folder; a missing one is an error naming it."""
    found = []
    for package in DEBIAN_PACKAGES:
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise MlasLoraError(f"{folder}: no {package}_*.deb (needed: {', '.join(DEBIAN_PACKAGES)})")
        found.append(debs[-1])
    return found


def wordnet_from_debs(debs: list[Path], out: Path) -> dict:
    """Write the NLTK WordNet files from the .debs into out; return provenance (package, sha256)."""
    files: dict[str, bytes] = {}
    for deb in debs:
        files.update(deb_files(deb))
    check_lexnames(files.get("usr/share/man/man5/lexnames.5WN.gz"))
    for name in WORDNET_FILES:
        data = files.get(DEBIAN_WORDNET_DIR + name)
        if data is None:
            raise MlasLoraError(f"{DEBIAN_WORDNET_DIR}{name} not found in {', '.join(map(str, debs))}")
        (out / name).write_bytes(data)
    return {"debs": [{"file": d.name, "sha256": hashlib.sha256(d.read_bytes()).hexdigest()} for d in debs]}


def wordnet_from_dict_dir(folder: Path, out: Path) -> dict:
    """Copy an unpacked WordNet 3.0 database (e.g. /usr/share/wordnet or WordNet-3.0/dict) into out."""
    for name in WORDNET_FILES:
        if not (folder / name).is_file():
            raise MlasLoraError(f"{folder}: missing WordNet file {name}")
        shutil.copyfile(folder / name, out / name)
    return {"dict_dir": str(folder)}


def prepare_wordnet(from_dir: str | os.PathLike | None = None) -> Path:
    """Build WordNet 3.0 for NLTK under wordnet_dir(), from Debian packages; return the directory.

    from_dir: a folder with the `wordnet-base_*.deb` and `wordnet-sense-index_*.deb` files, or an
    unpacked WordNet database (holding data.noun, ...). None: `apt-get download` them.
    The directory is built aside, renamed into place, then checked by loading it (removed if that fails).
    """
    target = wordnet_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    src = Path(from_dir) if from_dir is not None else None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wordnet-") as tmp:
        out = Path(tmp) / "wordnet"
        out.mkdir()
        if src is not None and (src / "data.noun").is_file():
            provenance = wordnet_from_dict_dir(src, out)
        else:
            debs = find_debs(src) if src is not None else download_debs(downloads_dir() / "wordnet")
            provenance = wordnet_from_debs(debs, out)
        (out / "lexnames").write_text(lexnames_text())
        (out / "source.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    load_wordnet.cache_clear()
    _check_loads(target, src)
    return target


def _check_loads(target: Path, src: Path | None) -> None:
    """Load the new WordNet as METEOR will; a WordNet that does not load is removed, not left half-usable."""
    try:
        ok = bool(load_wordnet().synsets("dog"))
    except Exception as exc:  # any reader failure means the files are not a usable WordNet 3.0
        shutil.rmtree(target, ignore_errors=True)
        load_wordnet.cache_clear()
        raise MlasLoraError(f"WordNet built from {src or 'apt-get'} does not load in NLTK: {exc}") from exc
    if not ok:
        shutil.rmtree(target, ignore_errors=True)
        raise MlasLoraError(f"WordNet built from {src or 'apt-get'} loads but has no synset for 'dog'")


def nltk_data_dir() -> Path:
    """cache_home()/nltk_data, first on `nltk.data.path`.

    NLTK (>= 3.9.3) reads corpora only under `nltk.data.path`, and its WordNet reader looks up the
    corpus named `wordnet` by that path (to map sense keys), so ours must be found first.
    """
    root = str(cache_home() / "nltk_data")
    if root in nltk.data.path:
        nltk.data.path.remove(root)
    nltk.data.path.insert(0, root)
    return Path(root)


def _open_reader(root: Path) -> WordNetCorpusReader:
    nltk_data_dir()
    with warnings.catch_warnings():
        # Without Open Multilingual WordNet NLTK warns that multilingual lookups are off; only English is used.
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return WordNetCorpusReader(str(root), None)


@lru_cache(maxsize=1)
def load_wordnet():
    """The prepared WordNet as an NLTK reader (read once per process); never downloads."""
    ok, reason = meteor_available()
    if not ok:
        raise MlasLoraError(reason)
    return _open_reader(wordnet_dir())


def meteor_tokens(text: str, tgt_lang: str) -> list[str]:
    """Whitespace tokens; characters for a language written without spaces (`UNSPACED`: Chinese...)."""
    if tgt_lang in UNSPACED:
        return [ch for ch in text if not ch.isspace()]
    return text.split()


def meteor_signature(tgt_lang: str) -> str:
    tok = "char" if tgt_lang in UNSPACED else "whitespace"
    return (
        f"nrefs:1|case:lc|tok:{tok}|stem:porter|syn:wordnet-3.0|alpha:{ALPHA}|beta:{BETA}|gamma:{GAMMA}"
        f"|agg:mean-x100|nltk:{nltk.__version__}"
    )


def meteor_corpus(
    hypotheses: Sequence[str], references: Sequence[str], tgt_lang: str, wordnet=None
) -> MetricResult:
    """Corpus METEOR: mean of NLTK segment scores x 100; unavailable (with reason) without WordNet.

    wordnet: any object with NLTK's `synsets(word)`; None loads the prepared WordNet 3.0.
    """
    from nltk.translate.meteor_score import single_meteor_score

    n = check_segments(hypotheses, references)
    if wordnet is None:
        ok, reason = meteor_available()
        if not ok:
            return unavailable("meteor", n, reason)
        wordnet = load_wordnet()
    total = 0.0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_tokens, ref_tokens = meteor_tokens(hyp, tgt_lang), meteor_tokens(ref, tgt_lang)
        total += single_meteor_score(
            ref_tokens, hyp_tokens, wordnet=wordnet, alpha=ALPHA, beta=BETA, gamma=GAMMA
        )
    return MetricResult("meteor", 100.0 * total / n, meteor_signature(tgt_lang), n)
