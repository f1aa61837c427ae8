"""Which character set a text sheet was saved in, and saying which one was used.

Excel saves "CSV" in the computer's own Windows character set: Western (1252) in Paris,
Central European (1250) in Warsaw, Shift-JIS in Tokyo. The bytes alone rarely tell those
apart (a Polish ``łódź_żółw.jpg`` read as Western becomes ``³ódŸ_¿ó³w.jpg``, and nothing
matches), so after the byte-order marks and UTF-8, the readings that decode cleanly
(Windows-1252, charset-normalizer's guesses, 1250, Shift-JIS) compete on how many uploaded
photo names each one finds in the sheet. Without photos to compare, Western European stays
the default unless charset-normalizer is sure of an East Asian one. The choice is always
said in a sentence (:func:`decode_text`), since a wrong one is otherwise silent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.base.problems import InputError

__all__ = ["decode_text", "encoding_label"]

_SNIFF_CHARS = 64_000
_SCORE_CHARS = 1_000_000  # photo names are counted in the first million characters
_DETECT_BYTES = 256_000  # what charset-normalizer sees
_EAST_ASIAN = frozenset("cp932 shift_jis euc_jp iso2022_jp gb2312 gb18030 gbk big5 cp950 euc_kr cp949".split())
_LABELS = {
    "cp1252": "Western European (Windows-1252)",
    "cp1250": "Central European (Windows-1250)",
    "cp1251": "Cyrillic (Windows-1251)",
    "cp1253": "Greek (Windows-1253)",
    "cp1254": "Turkish (Windows-1254)",
    "cp1257": "Baltic (Windows-1257)",
    "cp932": "Japanese (Shift-JIS)",
    "shift_jis": "Japanese (Shift-JIS)",
    "euc_jp": "Japanese (EUC-JP)",
    "gb18030": "Chinese (GB18030)",
    "big5": "Chinese (Big5)",
    "cp949": "Korean (Windows-949)",
    "latin-1": "Latin-1 (ISO-8859-1)",
}
_CELL_SPLIT = re.compile(r'[\t;,|\r\n"]+')


def encoding_label(encoding: str) -> str:
    """A character set's name as people know it ("Central European (Windows-1250)")."""
    return _LABELS.get(encoding, encoding)


def decode_text(data: bytes, *, filename: str, photo_names: Iterable[str] = ()) -> tuple[str, str, str | None]:
    """Decode a text sheet: ``(text, encoding, note)``; the note says which character set was
    chosen when it was not UTF-8 (None for UTF-8 and UTF-16). Raises :class:`InputError` for
    content that is no text in any of them."""
    boms = (
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    )
    for bom, name in boms:
        if data.startswith(bom):
            try:
                return _accept(data[len(bom) :], name, filename), name, None
            except UnicodeDecodeError:
                raise _not_text(filename) from None
    for name in (_utf16_without_bom(data), "utf-8"):
        try:
            return _accept(data, name, filename), name, None
        except (UnicodeDecodeError, TypeError):  # TypeError: no UTF-16 guess
            continue
    guesses = _detected(data)
    order = list(dict.fromkeys(["cp1252", "latin-1", *guesses, "cp1250", "cp932"]))  # ties: the first
    readings: dict[str, str] = {}
    for name in order:
        try:
            text = data.decode(name)
        except (UnicodeDecodeError, LookupError):
            continue
        if not _looks_binary(text):
            readings[name] = text
    if not readings:
        raise _not_text(filename)
    names = _name_keys(photo_names)
    found = {name: _names_found(text, names) for name, text in readings.items()} if names else {}
    best = max(readings, key=lambda n: (found.get(n, 0), n in _EAST_ASIAN and n == (guesses or [""])[0]))
    why = f", the reading that found the most uploaded photo names ({found[best]:,})" if found.get(best) else ""
    note = (
        f"'{filename}' is not saved as UTF-8: it was read as {encoding_label(best)}{why}. If letters look "
        "wrong, save the sheet in Excel as 'CSV UTF-8' and upload it again."
    )
    return readings[best], best, note


def _accept(payload: bytes, name: str, filename: str) -> str:
    text = payload.decode(name)  # UnicodeDecodeError: not this one
    if _looks_binary(text):
        raise _not_text(filename)
    return text


def _not_text(filename: str) -> InputError:
    return InputError(
        f"'{filename}' does not look like a spreadsheet: its content is not readable text. "
        "Upload the label sheet as CSV (comma or semicolon separated) or as an Excel .xlsx file."
    )


def _detected(data: bytes) -> list[str]:
    """charset-normalizer's readings of the start of the file, most likely first."""
    from charset_normalizer import from_bytes  # deferred: only non-UTF-8 sheets need it

    try:
        return [m.encoding for m in from_bytes(data[:_DETECT_BYTES])][:3]
    except Exception:  # a detector failure must not make a readable sheet unreadable
        return []


def _name_keys(photo_names: Iterable[str]) -> set[str]:
    keys = set()
    for name in photo_names:
        base = re.split(r"[\\/]", str(name))[-1].casefold()
        keys.update((base, base.rsplit(".", 1)[0]))
    keys.discard("")
    return keys


def _names_found(text: str, keys: set[str]) -> int:
    return sum(
        1 for cell in _CELL_SPLIT.split(text[:_SCORE_CHARS]) if re.split(r"[\\/]", cell.strip())[-1].casefold() in keys
    )


def _utf16_without_bom(data: bytes) -> str | None:
    """Spot UTF-16 text saved without a BOM: mostly-ASCII text has a zero in every other byte."""
    sample = data[:4000]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    if odd.count(0) > 0.4 * len(odd) and even.count(0) < 0.05 * len(even):
        return "utf-16-le"
    if even.count(0) > 0.4 * len(even) and odd.count(0) < 0.05 * len(odd):
        return "utf-16-be"
    return None


def _looks_binary(text: str) -> bool:
    sample = text[:_SNIFF_CHARS]
    if not sample:
        return False
    bad = sum(1 for ch in sample if (ch < " " and ch not in "\t\r\n\f\v") or "\x7f" <= ch <= "\x9f" or ch == "\ufffd")
    return "\x00" in sample or bad > max(2, 0.005 * len(sample))
