"""The one record type for a translation example."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mlas_lora.languages import Direction


@dataclass(frozen=True)
class Example:
    """A source segment, its reference translation, and their languages."""

    src_lang: str
    tgt_lang: str
    source: str
    reference: str

    @property
    def direction(self) -> Direction:
        return Direction(self.src_lang, self.tgt_lang)

    @property
    def pair(self) -> str:
        return f"{self.src_lang}-{self.tgt_lang}"

    def to_dict(self) -> dict:
        return asdict(self)
