"""Reading the spreadsheets analysts bring: label sheets and catalog exports.

A CSV saved by Excel (comma or semicolon, UTF-8 or a Windows encoding), a TSV, an .xlsx...
:func:`read_sheet` reads any of them into one :class:`Sheet` with named columns and the
sheet's own row numbers, and says in plain words why a file cannot be read at all
(:class:`~core.base.problems.InputError`). What the columns mean is for :mod:`core.inputs.labels`
(label sheets) and :mod:`core.inputs.catalog` (catalog exports) to decide.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePath

import pandas as pd

from core.base.problems import InputError, Problem
from core.inputs.encodings import decode_text
from core.inputs.filekinds import binary_kind
from core.inputs.images import PHOTO_NAME_EXTENSIONS

__all__ = ["SHEET_TYPES", "Sheet", "column_letter", "looks_like_image_ref", "read_sheet"]

SHEET_TYPES: tuple[str, ...] = ("csv", "tsv", "txt", "xlsx", "xlsm", "xls")
"""The one list of sheet file types (lower case, no dot) the Data and Tag pages' uploaders and the
command line take. An old .xls gets in so that :func:`read_sheet` can say how to save it as .xlsx."""
_DELIMITERS = ("\t", ";", ",", "|")  # order breaks exact ties only
_SNIFF_CHARS = 64_000
_SNIFF_ROWS = 200
_NO_DELIMITER = "\x1f"  # ASCII unit separator: never found in a real sheet

URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_EXT_PATTERN = "|".join(re.escape(e[1:]) for e in sorted(PHOTO_NAME_EXTENSIONS))
QUERY_AFTER_EXT_RE = re.compile(rf"(\.(?:{_EXT_PATTERN}))[?#].*$", re.IGNORECASE)
_IMAGE_REF_RE = re.compile(rf"\.(?:{_EXT_PATTERN})(?:[?#].*)?$", re.IGNORECASE)
INTEGRAL_RE = re.compile(r"([+-]?\d+)\.0+")
_NUMBER_RE = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")
INVISIBLE_CHARS = "\ufeff\u200b\u200c\u200d\u2060"


# --------------------------------------------------------------------------- reading


@dataclass
class Sheet:
    """A label sheet read into strings, with what is needed to quote its rows back.

    ``frame`` holds every cell as a stripped string ("" when empty) under the sheet's own
    column names (or "Column A", "Column B"... when the sheet has no header row). Empty rows
    are dropped but the index keeps their place: index label ``i`` is spreadsheet row
    ``first_data_row + i``, so problems can name the row the analyst sees in Excel.

    Read with ``keep_raw=True``, the sheet also keeps the table as written, for giving the
    same sheet back: ``raw_header`` is the header row (None when there is none) and
    ``raw_rows[i]`` the row of index label ``i``, cells unstripped, blank rows included up to
    the last row with content, every row as wide as the widest. Lines above the header
    (Excel's ``sep=;`` line, a title) are in neither.
    """

    frame: pd.DataFrame
    filename: str
    encoding: str | None
    delimiter: str | None
    has_header: bool
    first_data_row: int
    raw_header: list[str] | None = None
    raw_rows: list[list[str]] | None = None
    notes: list[Problem] = field(default_factory=list)  # how it was read: character set, formulas

    def sheet_row(self, index: int) -> int:
        """Spreadsheet row number (header = 1) of the frame row with index label ``index``."""
        return self.first_data_row + int(index)


# What a sheet is for, in the words its messages use: what it is called, what it lists, what it needs.
_PURPOSES = {
    "labels": ("label sheet", "each photo's file name and its label", "a column of photo names and a column of labels"),
    "catalog": ("catalog export", "one row per product with its photos' file names or links",
                "a column of photo file names or links"),
}


def read_sheet(
    source: Path | bytes, *, filename: str, keep_raw: bool = False, photo_names: Iterable[str] = (),
    purpose: str = "labels",
) -> Sheet:
    """Read a CSV/TSV (any common delimiter and encoding) or .xlsx/.xlsm label sheet, or with
    ``purpose="catalog"`` a catalog export (its messages then say so and what it needs).

    ``filename`` is the name the analyst knows the file by; it picks the format together
    with the file's first bytes and is quoted in every message. ``keep_raw`` also keeps the
    cells as written (see :class:`Sheet`). ``photo_names`` (the uploaded photos) decide
    between the character sets a text sheet may be in (:mod:`core.inputs.encodings`). Raises :class:`InputError` with a plain sentence
    when the file cannot be used as a sheet at all.
    """
    if isinstance(source, (str, PurePath)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InputError(f"Could not open '{filename}': {exc.strerror or exc}.") from exc
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"read_sheet expects a Path or bytes, got {type(source).__name__}")

    suffix = PurePath(filename).suffix.casefold()
    name, lists, needs = _PURPOSES[purpose]
    if not data.strip(b" \t\r\n\x00\xef\xbb\xbf\xff\xfe"):
        raise InputError(
            f"'{filename}' is empty. Save your {name} with at least {needs}, then upload it again."
        )
    if data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        raise InputError(
            f"'{filename}' is an old-style Excel file (.xls) or a password-protected workbook, "
            "which cannot be read here. Open it in Excel, remove any password, and use "
            "File > Save As > 'Excel Workbook (.xlsx)' or 'CSV UTF-8', then upload that file."
        )
    if data.startswith(b"PK\x03\x04"):
        rows, numbers, raw, notes = _read_workbook(data, filename=filename, keep_raw=keep_raw, purpose=purpose)
        sheet = _build_sheet(rows, numbers, filename=filename, encoding=None, delimiter=None, raw=raw, purpose=purpose)
        sheet.notes += notes
        return sheet
    kind = binary_kind(data)
    if kind is not None:
        raise InputError(
            f"'{filename}' is {kind}, not a {name}. Upload the spreadsheet that lists "
            f"{lists} (CSV or Excel .xlsx)."
        )

    try:
        text, encoding, note = decode_text(data, filename=filename, photo_names=photo_names)
    except InputError:
        if suffix in {".xls", ".xlsb", ".xlsx", ".xlsm", ".ods", ".numbers"}:
            raise InputError(
                f"'{filename}' is a spreadsheet format that cannot be read here, or a damaged "
                "file. Open it in Excel and use File > Save As > 'Excel Workbook (.xlsx)' or "
                "'CSV UTF-8', then upload that file."
            ) from None
        raise
    stripped = text.lstrip().casefold()
    if stripped.startswith(("<!doctype html", "<html", "<table", "<?xml")):
        raise InputError(
            f"'{filename}' is a web page or XML file saved under a spreadsheet name, not a real "
            "spreadsheet. Open it in Excel and use File > Save As > 'Excel Workbook (.xlsx)' or "
            "'CSV UTF-8', then upload that file."
        )
    rows, numbers, delimiter, raw = _parse_text(text, filename=filename, keep_raw=keep_raw)
    sheet = _build_sheet(rows, numbers, filename=filename, encoding=encoding, delimiter=delimiter, raw=raw,
                         purpose=purpose)
    sheet.notes += [Problem("sheet_encoding", note, file=filename, severity="info")] if note else []
    return sheet


def _read_workbook(data: bytes, *, filename: str, keep_raw: bool,
                   purpose: str) -> tuple[list[list[str]], list[int], list | None, list]:
    """Cells of the worksheet holding photo names (else the first non-empty one) of an
    .xlsx/.xlsm, as strings, with row numbers (and with ``keep_raw``, every row's cells
    unstripped, by row number - 1), and notes: which worksheet, formulas without values."""
    try:
        names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(
            f"'{filename}' looks like an Excel workbook but is damaged or incomplete. Open it in "
            "Excel and save it again (or save it as CSV), then upload it again."
        ) from exc
    if "xl/workbook.xml" not in names:
        if "content.xml" in names:
            what = "an OpenDocument (LibreOffice/Numbers) file"
        elif "word/document.xml" in names:
            what = "a Word document"
        else:
            what = "a zip archive"
        raise InputError(
            f"'{filename}' is {what}, not an Excel workbook. Save the {_PURPOSES[purpose][0]} as "
            "'Excel Workbook (.xlsx)' or as CSV and upload that file instead."
        )
    import openpyxl  # deferred: only workbooks need it

    try:
        workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=False, data_only=True)
    except Exception as exc:  # openpyxl raises many types for broken files
        raise InputError(
            f"'{filename}' could not be opened as an Excel workbook ({type(exc).__name__}). Open "
            "it in Excel and save it again as .xlsx or CSV, then upload it again."
        ) from exc
    try:
        sheets = sorted(workbook.worksheets, key=lambda ws: ws.sheet_state != "visible")
        found = []  # (worksheet, rows, numbers, raw) of each non-empty one
        for worksheet in sheets:
            shown = ([_excel_cell_text(v) for v in values] for values in worksheet.iter_rows(values_only=True))
            rows, numbers, raw = _collect(shown, keep_raw=keep_raw)
            if rows:
                found.append((worksheet.title, rows, numbers, raw))
                if _names_photos(rows):
                    break  # a "Notes" sheet in front is passed over for the one naming photos
    finally:
        workbook.close()
    if found:
        title, rows, numbers, raw = found[-1] if len(found) > 1 and _names_photos(found[-1][1]) else found[0]
        notes = [Problem("sheet_chosen", f"'{filename}': the photo names were found on the worksheet "
                         f"'{title}', which was used (not '{found[0][0]}').", file=filename, severity="info")]
        return rows, numbers, raw, (notes if title != found[0][0] else []) + _formulas_without_values(
            data, title, filename)
    raise InputError(
        f"Every worksheet in '{filename}' is empty. Put {_PURPOSES[purpose][2]} in the first "
        "worksheet and upload it again."
    )


def _names_photos(rows: list[list[str]]) -> bool:
    return any(looks_like_image_ref(c) for r in rows[:_SNIFF_ROWS] for c in r)


def _formulas_without_values(data: bytes, title: str, filename: str, limit: int = 20) -> list[Problem]:
    """Formula cells with no saved result (a file written by a program, never opened in Excel):
    they read as empty, so each is said, with its row. Only looked for when formulas exist."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        if not any(b"<f" in zf.read(n) for n in zf.namelist() if n.startswith("xl/worksheets/sheet")):
            return []
    import openpyxl

    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=False)
    values = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        cells = [
            (f.coordinate, f.row, f.value)
            for formulas, saved in zip(workbook[title].iter_rows(), values[title].iter_rows(), strict=False)
            for f, v in zip(formulas, saved, strict=False)
            if isinstance(f.value, str) and f.value.startswith("=") and v.value is None
        ]
    finally:
        workbook.close()
        values.close()
    notes = [
        Problem("formula_without_value", f"Cell {ref} of '{filename}' holds the formula {formula[:60]} but no saved "
                "result, so it reads as empty. Open the file in Excel, save it, and upload it again.",
                file=filename, row=row, severity="warning")
        for ref, row, formula in cells[:limit]
    ]
    if len(cells) > limit:
        notes.append(Problem("formula_without_value", f"{len(cells) - limit:,} more formula cells of '{filename}' "
                             "have no saved result.", file=filename, severity="warning"))
    return notes


def _excel_cell_text(value: object) -> str:
    """Show an Excel cell the way Excel displays it: 1.0 as "1", TRUE, dates as ISO (text as typed)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".15g")
    if isinstance(value, datetime):
        if value.time() == time(0):
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, (date, time)):
        return value.isoformat()
    return str(value)


def _collect(records: Iterable[list[str]], *, keep_raw: bool) -> tuple[list[list[str]], list[int], list | None]:
    """The non-blank rows (clean cells) with their sheet row numbers and, with ``keep_raw``,
    every record as written (blank ones as ``[]``), from either reader's records."""
    rows: list[list[str]] = []
    numbers: list[int] = []
    raw: list[list[str]] | None = [] if keep_raw else None
    for number, record in enumerate(records, start=1):
        cells = [_clean_cell(c) for c in record]
        if raw is not None:
            raw.append(record if any(cells) else [])
        if any(cells):
            rows.append(cells)
            numbers.append(number)
    return rows, numbers, raw


def _clean_cell(value: str) -> str:
    return value.strip().strip(INVISIBLE_CHARS).strip()


def _parse_text(text: str, *, filename: str, keep_raw: bool) -> tuple[list[list[str]], list[int], str | None, list | None]:
    """Split delimited text into rows of cells; returns rows, their sheet row numbers, the delimiter
    and, with ``keep_raw``, every record's cells as written (by row number - 1)."""
    delimiter = None
    first_line, _, rest = text.partition("\n")
    declared = re.fullmatch(r"\s*sep=(.)\s*", first_line.strip("\r" + INVISIBLE_CHARS))
    if declared:  # Excel's "sep=;" line: Excel hides it, so rows are counted without it
        delimiter, text = declared.group(1), rest
    else:
        delimiter = _detect_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter or _NO_DELIMITER)
    try:
        rows, numbers, raw = _collect(reader, keep_raw=keep_raw)
    except csv.Error as exc:
        # csv's field size limit is process-wide, so it is not raised here: a field that large
        # is almost always a stray quote mark that swallowed the rest of the file.
        if "field larger than field limit" in str(exc):
            raise InputError(_unclosed_quote_message(reader.line_num, filename)) from exc
        raise InputError(
            f"'{filename}' could not be read as a table ({exc}). Open it in Excel and save it "
            "again as 'CSV UTF-8' or as .xlsx, then upload it again."
        ) from exc
    _check_unclosed_quote(rows, numbers, delimiter, filename=filename)
    return rows, numbers, delimiter, raw


def _check_unclosed_quote(rows: list[list[str]], numbers: list[int], delimiter: str | None, *, filename: str) -> None:
    """Refuse a sheet where a stray quote mark swallowed the following rows into one cell.

    Guessing where the quote should have closed could tie labels to the wrong photos, so
    the analyst is asked to fix the row instead.
    """
    if delimiter is None:
        return
    for cells, number in zip(rows, numbers, strict=True):
        for cell in cells:
            if "\n" in cell and sum(delimiter in line for line in cell.splitlines()[1:]) >= 2:
                raise InputError(_unclosed_quote_message(number, filename))


def _unclosed_quote_message(row: int, filename: str) -> str:
    return (
        f"Row {row} of '{filename}' (or a row just above it) opens a quotation mark (\") that is never "
        "closed, so the rows after it run together into one cell. Remove the stray quotation mark "
        "(or open the file in Excel and save it again), then upload it again."
    )


def _detect_delimiter(text: str) -> str | None:
    """Pick the delimiter that splits the first rows into the most consistent number of fields.

    A row's trailing empty fields are also tried without counting them, because Excel writes
    "a;b;;;" on some rows and "a;b" on others. Returns None for a one-column sheet.
    """
    sample = text[:_SNIFF_CHARS]
    truncated = len(text) > len(sample)
    if truncated and "\n" in sample:
        sample = sample[: sample.rindex("\n")]
    best: tuple[float, int, int] | None = None
    chosen = None
    for priority, delim in enumerate(reversed(_DELIMITERS)):
        if delim not in sample:
            continue
        try:
            records = [[c.strip() for c in r] for r in csv.reader(io.StringIO(sample, newline=""), delimiter=delim)]
        except csv.Error:
            continue
        records = [r for r in records if r][:_SNIFF_ROWS]
        filled = [r for r in records if any(r)]
        for counts in (
            [len(r) for r in records],
            [max(i for i, c in enumerate(r) if c) + 1 for r in filled],
        ):
            if not counts:
                continue
            mode, hits = max(Counter(counts).items(), key=lambda kv: (kv[1], kv[0]))
            if mode < 2:
                continue
            score = (hits / len(counts), mode, priority)
            if best is None or score > best:
                best, chosen = score, delim
    return chosen


def _build_sheet(
    rows: list[list[str]],
    numbers: list[int],
    *,
    filename: str,
    encoding: str | None,
    delimiter: str | None,
    raw: list[list[str]] | None = None,
    purpose: str = "labels",
) -> Sheet:
    """Turn non-empty rows (with their sheet row numbers) into a :class:`Sheet`; ``raw`` holds
    every row as written (row number - 1) when the sheet must keep them."""
    if not rows:
        raise InputError(
            f"'{filename}' has no rows with content. Save your {_PURPOSES[purpose][0]} with "
            f"{_PURPOSES[purpose][2]}, then upload it again."
        )
    # A title line above the table ("Labels for March") is not the header: skip such lines.
    skip = 0
    while skip < min(5, len(rows) - 1):
        filled = [c for c in rows[skip] if c]
        below = sum(1 for c in rows[skip + 1] if c)
        if len(filled) != 1 or not rows[skip][0] or below < 2 or looks_like_image_ref(filled[0]):
            break
        skip += 1
    rows, numbers = rows[skip:], numbers[skip:]
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    has_header = not _row_looks_like_data(rows[0], rows[1:_SNIFF_ROWS])
    if has_header:
        header, body, body_numbers = rows[0], rows[1:], numbers[1:]
        first_data_row = numbers[0] + 1
    else:
        header, body, body_numbers = [""] * width, rows, numbers
        first_data_row = numbers[0]

    keep = [i for i in range(width) if not _is_unnamed(header[i]) or any(r[i] for r in body)]
    if not keep:
        raise InputError(
            f"'{filename}' has no usable columns. Give it {_PURPOSES[purpose][2]}, then upload it again."
        )
    if has_header and not body:
        raise InputError(
            f"'{filename}' has column names ({', '.join(repr(header[i]) for i in keep)}) but no "
            "rows below them. Add one row per photo, then upload it again."
        )
    names = _unique_names([header[i] if not _is_unnamed(header[i]) else f"Column {column_letter(i)}" for i in keep])
    frame = pd.DataFrame(
        {name: [r[i] for r in body] for name, i in zip(names, keep, strict=True)},
        index=pd.Index([n - first_data_row for n in body_numbers], dtype="int64"),
        columns=names,
    )
    raw_header = raw_rows = None
    if raw is not None:  # from the header (or first data row) to the last row with content
        kept = ([raw[numbers[0] - 1]] if has_header else []) + raw[first_data_row - 1 : numbers[-1]]
        raw_width = max(map(len, kept))
        kept = [r + [""] * (raw_width - len(r)) for r in kept]
        raw_header, raw_rows = (kept[0], kept[1:]) if has_header else (None, kept)
    return Sheet(
        frame=frame,
        filename=filename,
        encoding=encoding,
        delimiter=delimiter,
        has_header=has_header,
        first_data_row=first_data_row,
        raw_header=raw_header,
        raw_rows=raw_rows,
    )


def _row_looks_like_data(first: list[str], below: list[list[str]]) -> bool:
    """True when the first row is data, not column names (e.g. it starts "123.jpg")."""
    cells = [(i, c) for i, c in enumerate(first) if c]
    if not cells:
        return False
    if any(looks_like_image_ref(c) for _, c in cells):
        return True
    column_values = [{r[i].casefold() for r in below if i < len(r)} for i in range(len(first))]
    return all(_is_number(c) or c.casefold() in column_values[i] for i, c in cells)


def _is_unnamed(name: str) -> bool:
    return not name or re.fullmatch(r"Unnamed: \d+(_level_\d+)?", name) is not None


def column_letter(index: int) -> str:
    """Excel's name for the column at 0-based ``index``: A, B, ... Z, AA..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _unique_names(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    taken = set(names)
    out = []
    for name in names:
        seen[name] += 1
        if seen[name] == 1:
            out.append(name)
            continue
        n = seen[name]
        while f"{name} ({n})" in taken:
            n += 1
        out.append(f"{name} ({n})")
        taken.add(out[-1])
    return out


def _is_number(value: str) -> bool:
    return _NUMBER_RE.fullmatch(value) is not None


def looks_like_image_ref(value: str) -> bool:
    return bool(_IMAGE_REF_RE.search(value)) or bool(URL_RE.match(value))


