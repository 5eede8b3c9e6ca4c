"""Language codes, their English names, and translation directions.

A language is an ISO 639 code (639-1 where the language has one: `fr`, else 639-3: `yue`), named in
English by `langcodes` with CLDR's data (`language_data`), so any language needs no table here. The
paper's languages (its Table 3) keep the names they always had (`PINNED_NAMES`): the prompt, and so
every stage and hypothesis key, must not change when a newer CLDR renames a language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from mlas_lora.errors import MlasLoraError

PINNED_NAMES: dict[str, str] = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "et": "Estonian",
    "fi": "Finnish",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}
"""The names in the prompts of every run made so far; CLDR's agree today, these win if it changes."""

PAPER_LANGUAGES = ("cs", "de", "et", "fi", "ru", "tr", "zh")

UNSPACED = ("zh", "ja", "th", "lo", "km", "my", "bo")
"""Languages written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer, Burmese,
Tibetan): word-based metrics split them into characters where no word splitter is installed."""

NOT_LANGUAGES = ("und", "mul", "mis", "zxx")
"""ISO 639 codes for no particular language (undetermined, multiple, uncoded, no linguistic content)."""

EXPECTED = "expected an ISO 639 language code such as en, de, fr or yue"


@cache
def language_name(code: str) -> str:
    """English name of an ISO 639 code (`fr` -> French, `yue` -> Cantonese); anything else raises,
    naming the code. A 3-letter code of a language that has a 2-letter one (`fra`) is refused with
    that code, so that one language has one code in file names and keys."""
    if code in PINNED_NAMES:
        return PINNED_NAMES[code]
    import langcodes

    if not isinstance(code, str) or not re.fullmatch(r"[a-z]{2,3}", code) or not langcodes.tag_is_valid(code):
        if isinstance(code, str) and re.fullmatch(r"[A-Za-z]{2,3}", code) and code != code.lower():
            raise MlasLoraError(f"language code {code!r}: write it in lower case, {code.lower()!r}")
        raise MlasLoraError(f"unknown language code {code!r}: {EXPECTED}")
    if code in NOT_LANGUAGES:
        raise MlasLoraError(f"language code {code!r} names no single language: {EXPECTED}")
    name = langcodes.Language.get(code, normalize=False).display_name("en")
    if not name.startswith("Unknown language"):
        return name
    shorter = langcodes.Language.get(code)  # `fra` -> `fr`
    if shorter.language != code and not shorter.display_name("en").startswith("Unknown language"):
        raise MlasLoraError(
            f"language code {code!r}: write {shorter.language!r} ({shorter.display_name('en')}), its "
            "ISO 639-1 code, so that one language has one code in file names and keys"
        )
    raise MlasLoraError(f"unknown language code {code!r}: {EXPECTED}")  # well-formed, unnamed (qaa)


def iso639_3(code: str) -> str:
    """The 3-letter ISO 639 code of a language code (`fr` -> `fra`), as FLORES-200 names its columns."""
    import langcodes

    language_name(code)
    return langcodes.Language.get(code).to_alpha3()


@dataclass(frozen=True, order=True)
class Direction:
    """A translation direction such as `en-de` (source English, target German)."""

    src: str
    tgt: str

    @classmethod
    def parse(cls, text: str) -> Direction:
        parts = text.strip().split("-")
        if len(parts) != 2 or not all(parts):
            raise MlasLoraError(f"bad direction {text!r}: expected SRC-TGT such as 'en-de'")
        src, tgt = parts
        language_name(src)
        language_name(tgt)
        if src == tgt:
            raise MlasLoraError(f"bad direction {text!r}: source and target are the same language")
        return cls(src, tgt)

    def __str__(self) -> str:
        return f"{self.src}-{self.tgt}"

    def reversed(self) -> Direction:
        return Direction(self.tgt, self.src)


def paper_directions(langs: tuple[str, ...] = PAPER_LANGUAGES, pivot: str = "en") -> list[Direction]:
    """The 14 directions of the paper: pivot->xx then xx->pivot for every xx."""
    return [Direction(pivot, x) for x in langs] + [Direction(x, pivot) for x in langs]


def parse_directions(items) -> list[Direction]:
    """Directions from a list or a comma-separated string."""
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    return [d if isinstance(d, Direction) else Direction.parse(d) for d in items]
