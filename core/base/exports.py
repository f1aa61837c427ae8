"""Every spreadsheet the app and the command line hand out: CSV, Excel and Parquet, safely.

A cell such as ``=HYPERLINK("http://…","Click")`` or ``@SUM(…)`` in a catalog, a class name or
a file name would run as a formula when an analyst opens the download in Excel or LibreOffice
(OWASP "CSV injection"). Whatever a table holds, the files written here never carry one:

- **Excel**: every text cell is written as text (``t="inlineStr"``), never as a formula, so
  ``=1+1`` reads back as the four characters ``=1+1``; numbers stay numbers.
- **CSV** has no other way to say "this is text": a cell that starts with ``=``, ``+``, ``-``,
  ``@``, a tab or a carriage return and is not a plain number gets a leading apostrophe
  (:func:`neutralise`), the catalog's own cells and the header included.
- **Parquet** keeps typed values as they are (no program runs them as formulas).

Excel holds at most :data:`EXCEL_MAX_ROWS` rows: a larger table is refused with a message
that offers CSV or Parquet (:class:`TooManyRowsError`) instead of a file Excel cuts short.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from core.base.files import atomic_write_bytes
from core.base.problems import InputError

__all__ = [
    "EXCEL_MAX_ROWS",
    "FORMATS",
    "TooManyRowsError",
    "csv_bytes",
    "format_of",
    "neutralise",
    "parquet_bytes",
    "table_bytes",
    "write_table",
    "xlsx_bytes",
]

EXCEL_MAX_ROWS = 1_048_576
"""Rows in one Excel worksheet, the header row included."""

FORMATS = ("csv", "xlsx", "parquet")
_SUFFIXES = {".xlsx": "xlsx", ".xlsm": "xlsx", ".parquet": "parquet", ".pq": "parquet"}

_RISKY_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")


class TooManyRowsError(InputError):
    """A table too long for one Excel worksheet; ``str()`` says so and offers CSV or Parquet."""


def neutralise(value):
    """A CSV cell that no spreadsheet program runs as a formula: text starting with ``= + - @``,
    a tab or a carriage return, and not a plain number (``-12``, ``+3.5``, ``-1,5``), gets a
    leading apostrophe; anything else comes back unchanged."""
    if isinstance(value, str) and value.startswith(_RISKY_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def format_of(path: str | Path) -> str:
    """The format a file name asks for: "xlsx", "parquet", else "csv"."""
    return _SUFFIXES.get(Path(path).suffix.lower(), "csv")


def csv_bytes(frame: pd.DataFrame, *, delimiter: str = ",", encoding: str = "utf-8-sig") -> bytes:
    """The table as CSV (header first, no index), every cell neutralised (see :func:`neutralise`).

    UTF-8 gets the byte-order mark Excel needs to show accents; characters another encoding
    cannot hold are replaced rather than failing the download."""
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8", "ascii"):
        encoding = "utf-8-sig"
    safe = _neutralised(frame)
    text = safe.to_csv(index=False, sep=delimiter, lineterminator="\r\n")
    return text.encode(encoding, errors="replace")


def xlsx_bytes(frame: pd.DataFrame, *, sheet_name: str = "Sheet1") -> bytes:
    """The table as an Excel workbook: text cells are text, never formulas; numbers are numbers.

    Raises :class:`TooManyRowsError` when the table does not fit in one worksheet."""
    _check_excel_rows(len(frame))
    import openpyxl  # deferred: only Excel downloads need it
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet(sheet_name)

    def cells(values: Iterable) -> list:
        row = []
        for value in values:
            if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
                row.append(None)
            elif isinstance(value, str):
                # Excel cannot store control characters; everything else goes in exactly as written.
                cell = WriteOnlyCell(sheet, value=ILLEGAL_CHARACTERS_RE.sub("", value))
                cell.data_type = "s"  # text, even when it starts with "=" (openpyxl would make a formula)
                row.append(cell)
            elif hasattr(value, "item"):  # numpy scalars
                row.append(value.item())
            else:
                row.append(value)
        return row

    sheet.append(cells(str(c) for c in frame.columns))
    for values in frame.itertuples(index=False, name=None):
        sheet.append(cells(values))
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """The table as Parquet (for tables too long for Excel, and for data tools); repeated or
    blank column names get a number (Parquet needs unique names)."""
    out = frame.copy()
    out.columns = _unique_names(str(c) for c in frame.columns)
    buf = io.BytesIO()
    out.to_parquet(buf, index=False)
    return buf.getvalue()


def table_bytes(frame: pd.DataFrame, fmt: str, *, delimiter: str = ",", encoding: str = "utf-8-sig") -> bytes:
    """The table in one of :data:`FORMATS` (``delimiter`` and ``encoding`` are for CSV)."""
    if fmt == "xlsx":
        return xlsx_bytes(frame)
    if fmt == "parquet":
        return parquet_bytes(frame)
    if fmt == "csv":
        return csv_bytes(frame, delimiter=delimiter, encoding=encoding)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def write_table(
    frame: pd.DataFrame, out: Path, *, fmt: str | None = None, delimiter: str = ",", encoding: str = "utf-8-sig"
) -> Path:
    """Write the table to ``out`` atomically, in ``fmt`` or the format its name asks for."""
    atomic_write_bytes(out, table_bytes(frame, fmt or format_of(out), delimiter=delimiter, encoding=encoding))
    return out


def _check_excel_rows(rows: int) -> None:
    if rows + 1 > EXCEL_MAX_ROWS:
        raise TooManyRowsError(
            f"This table has {rows:,} rows, more than Excel can open ({EXCEL_MAX_ROWS - 1:,} rows under the "
            "header). Use CSV or Parquet instead: both keep every row."
        )


def _neutralised(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.columns = [neutralise(str(c)) for c in frame.columns]
    for i in range(out.shape[1]):
        column = out.iloc[:, i]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            out.isetitem(i, column.map(neutralise))
    return out


def _unique_names(names: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        base = name or "column"
        candidate, n = base, 1
        while candidate in seen:
            n += 1
            candidate = f"{base} ({n})"
        seen[candidate] = 1
        out.append(candidate)
    return out
