"""Language codes and names (the paper's Table 3) and translation directions.

The table is data: add an ISO 639-1 code and its English name to `LANGUAGES` to support it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlas_lora.errors import MlasLoraError

LANGUAGES: dict[str, str] = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "et": "Estonian",
    "fi": "Finnish",
    "ru": "Russian",
    "tr": "Turkish",
    "zh": "Chinese",
}

PAPER_LANGUAGES = ("cs", "de", "et", "fi", "ru", "tr", "zh")


def language_name(code: str) -> str:
    """English name of a language code; unknown codes raise with the supported list."""
    try:
        return LANGUAGES[code]
    except KeyError:
        supported = ", ".join(f"{c} ({n})" for c, n in sorted(LANGUAGES.items()))
        raise MlasLoraError(f"unknown language code {code!r}; supported: {supported}") from None


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
