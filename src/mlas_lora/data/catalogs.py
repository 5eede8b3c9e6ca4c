"""Gettext translation catalogs: a reader for compiled `.mo` files, a writer, and a `.po` reader.

LibreOffice ships its UI strings as `.mo` catalogs, Django and Wagtail ship `.po` sources; both map
an English `msgid` to a translated `msgstr`. Only the stdlib is used, so the corpus builder runs
without gettext tools installed.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

from mlas_lora.errors import MlasLoraError

MO_MAGIC = 0x950412DE
CONTEXT_SEP = "\x04"  # msgctxt and msgid are stored as "ctxt\x04id" in a .mo file
PLURAL_SEP = "\x00"  # plural forms are stored as "one\x00other"


class Message(NamedTuple):
    """One catalog entry, plural entries reduced to their singular form."""

    context: str
    source: str
    translation: str


def _split_mo_key(key: str, value: str) -> Message:
    context, _, source = key.rpartition(CONTEXT_SEP)
    return Message(context, source.split(PLURAL_SEP)[0], value.split(PLURAL_SEP)[0])


def parse_mo(data: bytes, name: str = "<mo>") -> list[Message]:
    """Entries of a compiled `.mo` catalog; the header entry (empty msgid) is left out.

    Layout (GNU gettext manual, "The Format of GNU MO Files"): magic, revision, count N, offset
    of the original-strings table, offset of the translations table; each table holds N
    (length, offset) pairs pointing at UTF-8 strings.
    """
    if len(data) < 20:
        raise MlasLoraError(f"{name}: not a .mo catalog (only {len(data)} bytes)")
    for order in "<>":
        magic, _rev, count, orig_at, trans_at = struct.unpack(order + "5I", data[:20])
        if magic == MO_MAGIC:
            break
    else:
        raise MlasLoraError(f"{name}: not a .mo catalog (bad magic number {data[:4].hex()})")
    try:
        messages = []
        for i in range(count):
            key = _mo_string(data, order, orig_at + 8 * i)
            if key:
                messages.append(_split_mo_key(key, _mo_string(data, order, trans_at + 8 * i)))
        return messages
    except (struct.error, UnicodeDecodeError, IndexError) as err:
        raise MlasLoraError(f"{name}: corrupt .mo catalog ({err})") from None


def _mo_string(data: bytes, order: str, table_at: int) -> str:
    length, offset = struct.unpack(order + "2I", data[table_at : table_at + 8])
    if offset + length > len(data):
        raise IndexError(f"string at {offset} runs past the end of the file")
    return data[offset : offset + length].decode("utf-8")


def write_mo(messages: list[Message] | list[tuple[str, str, str]]) -> bytes:
    """A little-endian `.mo` catalog holding `messages` (used to build test fixtures)."""
    keys = [(f"{c}{CONTEXT_SEP}{s}" if c else s).encode() for c, s, _ in messages]
    values = [t.encode() for _, _, t in messages]
    order = sorted(range(len(keys)), key=lambda i: keys[i])  # gettext expects sorted keys
    count = len(order)
    orig_at, trans_at = 28, 28 + 8 * count
    data_at = trans_at + 8 * count
    tables, blob = [b"", b""], b""
    for column, strings in enumerate((keys, values)):
        for i in order:
            tables[column] += struct.pack("<2I", len(strings[i]), data_at + len(blob))
            blob += strings[i] + b"\0"
    header = struct.pack("<7I", MO_MAGIC, 0, count, orig_at, trans_at, 0, data_at)
    return header + tables[0] + tables[1] + blob


_PO_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    '"': '"',
    "\\": "\\",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
}
_PO_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_PO_KEYWORD_RE = re.compile(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+"(.*)"\s*$')


def _po_unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        code = m.group(1)
        if code[0] == "x":
            return chr(int(code[1:], 16))
        if code[0].isdigit():
            return chr(int(code, 8))
        return _PO_ESCAPES.get(code, code)

    return _PO_ESCAPE_RE.sub(one, text)


class _PoEntry:
    """Fields of the entry being read; `fuzzy` comes from its `#,` flags comment."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.fuzzy = False

    def message(self) -> Message | None:
        source = self.fields.get("msgid", "")
        translation = self.fields.get("msgstr", self.fields.get("msgstr[0]", ""))
        if self.fuzzy or not source or not translation:
            return None
        return Message(self.fields.get("msgctxt", ""), source, translation)


def parse_po(text: str, name: str = "<po>") -> list[Message]:
    """Translated entries of a `.po` catalog: multi-line strings joined, escapes decoded.

    Fuzzy entries, obsolete (`#~`) entries, untranslated entries and the header are skipped;
    plural entries keep the singular `msgid` with `msgstr[0]`.
    """
    messages: list[Message] = []
    entry, key = _PoEntry(), None

    def flush() -> None:
        nonlocal entry, key
        message = entry.message()
        if message is not None:
            messages.append(message)
        entry, key = _PoEntry(), None

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        starts_entry = line.startswith("#") or line.startswith(("msgctxt", "msgid "))
        if not line or (starts_entry and any(k.startswith("msgstr") for k in entry.fields)):
            flush()
        if not line or line.startswith("#~"):
            continue
        if line.startswith("#"):
            if line.startswith("#,"):
                entry.fuzzy |= "fuzzy" in {flag.strip() for flag in line[2:].split(",")}
            continue
        match = _PO_KEYWORD_RE.match(line)
        if match:
            key = match.group(1)
            entry.fields[key] = _po_unescape(match.group(3))
        elif line.startswith('"') and line.endswith('"') and len(line) >= 2 and key is not None:
            entry.fields[key] += _po_unescape(line[1:-1])
        else:
            raise MlasLoraError(
                f"{name}, line {lineno}: cannot read {raw.strip()[:60]!r} as a .po entry line"
            )
    flush()
    return messages
