"""Cleaning of UI-catalog pairs and the deterministic train/dev/test split.

UI strings carry mnemonic markers (`~Save`, `&Open`, `Sa_ve`, Chinese `保存(~S)`) that no
translation system should learn to emit; they are removed. Format placeholders (`%s`,
`%(name)s`, `$1`, `%PRODUCTNAME`) are part of the meaning and stay untouched.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

PLACEHOLDER_RE = re.compile(
    r"%\(\w+\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]"  # %(name)s, %(count)d
    r"|%[-#0+]*\d*(?:\.\d+)?[sdifurxXc]"  # %s, %d, %5.2f
    r"|%\d+"  # %1 (LibreOffice, Qt)
    r"|%[A-Z][A-Z0-9_]*%?"  # %PRODUCTNAME
    r"|\$\d+|\$\([A-Za-z0-9_]+\)|\$[A-Z][A-Z0-9_]*\$?"  # $1, $(ARG1), $PRODUCTNAME$
    r"|\{[A-Za-z0-9_.]*\}"  # {name}, {0}, {}
)
MARKUP_RE = re.compile(r"</?[A-Za-z][^<>]*>|&(?:[a-zA-Z]+|#\d+|#x[0-9a-fA-F]+);")
CJK_MNEMONIC_RE = re.compile(r"\s*\(\s*[~_&][A-Za-z0-9]\s*\)")
# `&` between words is a conjunction ("Date&Time"); only a word-initial `&` is a mnemonic.
AMP_MNEMONIC_RE = re.compile(r"(?<![^\s(])&(?=[^\W_])(?![a-zA-Z]+;|#\d+;|#x[0-9a-fA-F]+;)")
UNDERSCORE_MNEMONIC_RE = re.compile(r"_(?=\S)")


def _protect(text: str, pattern: re.Pattern) -> tuple[str, list[str]]:
    """Replace pattern matches by private-use characters so mnemonic rules cannot touch them."""
    kept: list[str] = []

    def hide(m: re.Match) -> str:
        kept.append(m.group(0))
        return chr(0xE000 + len(kept) - 1)

    return pattern.sub(hide, text), kept


def _restore(text: str, kept: list[str]) -> str:
    for i, original in enumerate(kept):
        text = text.replace(chr(0xE000 + i), original)
    return text


def strip_mnemonics(text: str, underscore: bool = False) -> str:
    """Remove accelerator markers; `underscore` also removes a GTK-style `_` (LibreOffice .ui).

    A `_` counts as a mnemonic only when it is the string's single underscore (`PDF_/A`,
    `Z_entriert`), so identifiers such as `snake_case_name` survive.
    """
    text, kept = _protect(text, PLACEHOLDER_RE)
    text = CJK_MNEMONIC_RE.sub("", text).replace("~", "")
    text = AMP_MNEMONIC_RE.sub("", text)
    if underscore and text.count("_") == 1:
        text = UNDERSCORE_MNEMONIC_RE.sub("", text)
    return _restore(text, kept)


def normalise_space(text: str) -> str:
    return " ".join(text.split())


def has_words(text: str) -> bool:
    """True when something other than placeholders and markup carries letters."""
    bare = MARKUP_RE.sub(" ", PLACEHOLDER_RE.sub(" ", text))
    return any(ch.isalpha() for ch in bare)


def clean_text(text: str, underscore: bool = False) -> str:
    return normalise_space(strip_mnemonics(text, underscore=underscore))


def clean_pair(source: str, translation: str, underscore: bool = False) -> tuple[str, str] | None:
    """The cleaned (English, translation) pair, or None when it should be dropped."""
    en, xx = clean_text(source, underscore), clean_text(translation, underscore)
    if not en or not xx or en == xx or not has_words(en) or not has_words(xx):
        return None
    return en, xx


def pick_translations(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One translation per English string: the most frequent, ties broken by sort order.

    The same English UI string appears in many contexts; keeping one reference per source makes
    the result independent of catalog order and gives test sets a single reference.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for en, xx in pairs:
        counts[en][xx] += 1
    return {en: min(c, key=lambda xx: (-c[xx], xx)) for en, c in counts.items()}


def english_words(text: str) -> int:
    return len(text.split())


def unit_hash(text: str, salt: str = "mlas-lora-split") -> float:
    """A uniform number in [0, 1) from the string alone, the same on every machine and run."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(english: str, test_frac: float, dev_frac: float, min_eval_words: int = 4) -> str:
    """`train`, `dev` or `test` from the English string only, so every language agrees.

    Strings shorter than `min_eval_words` always train: evaluation wants sentence-like segments.
    """
    if english_words(english) < min_eval_words:
        return "train"
    h = unit_hash(english)
    return "test" if h < test_frac else "dev" if h < test_frac + dev_frac else "train"
