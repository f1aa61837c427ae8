"""Label sheets: read the analyst's spreadsheet, find its columns, tie its rows to photos.

Analysts bring the label sheet they already have: a CSV saved by Excel (comma or semicolon,
UTF-8 or Windows encoding), a TSV, an .xlsx... This module reads any of them into one
:class:`Sheet`, guesses which column names the photo and which holds the label, matches the
rows to the uploaded photos and says, row by row, what could not be used and why. Nothing
here raises on a single bad row: rows become :class:`~core.problems.Problem` entries, and only
a file that cannot be read at all raises :class:`~core.problems.InputError`.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit

import pandas as pd

from core.problems import InputError, Problem

__all__ = [
    "MatchResult",
    "Sheet",
    "class_display_defaults",
    "guess_columns",
    "labels_look_coded",
    "match_labels",
    "normalise_name",
    "read_sheet",
    "training_blockers",
]

IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .jpe .jfif .png .gif .webp .bmp .tif .tiff .heic .heif .avif".split())
_DELIMITERS = ("\t", ";", ",", "|")  # order breaks exact ties only
_SNIFF_CHARS = 64_000
_SNIFF_ROWS = 200
_NO_DELIMITER = "\x1f"  # ASCII unit separator: never found in a real sheet

_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_EXT_PATTERN = "|".join(re.escape(e[1:]) for e in sorted(IMAGE_EXTENSIONS))
_QUERY_AFTER_EXT_RE = re.compile(rf"(\.(?:{_EXT_PATTERN}))[?#].*$", re.IGNORECASE)
_IMAGE_REF_RE = re.compile(rf"\.(?:{_EXT_PATTERN})(?:[?#].*)?$", re.IGNORECASE)
_INTEGRAL_RE = re.compile(r"([+-]?\d+)\.0+")
_NUMBER_RE = re.compile(r"[+-]?(\d+([.,]\d*)?|[.,]\d+)([eE][+-]?\d+)?")
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"


# --------------------------------------------------------------------------- reading


@dataclass
class Sheet:
    """A label sheet read into strings, with what is needed to quote its rows back.

    ``frame`` holds every cell as a stripped string ("" when empty) under the sheet's own
    column names (or "Column A", "Column B"... when the sheet has no header row). Empty rows
    are dropped but the index keeps their place: index label ``i`` is spreadsheet row
    ``first_data_row + i``, so problems can name the row the analyst sees in Excel.
    """

    frame: pd.DataFrame
    filename: str
    encoding: str | None
    delimiter: str | None
    has_header: bool
    first_data_row: int

    def sheet_row(self, index: int) -> int:
        """Spreadsheet row number (header = 1) of the frame row with index label ``index``."""
        return self.first_data_row + int(index)


def read_sheet(source: Path | bytes, *, filename: str) -> Sheet:
    """Read a CSV/TSV (any common delimiter and encoding) or .xlsx/.xlsm label sheet.

    ``filename`` is the name the analyst knows the file by; it picks the format together
    with the file's first bytes and is quoted in every message. Raises :class:`InputError`
    with a plain sentence when the file cannot be used as a sheet at all.
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
    if not data.strip(b" \t\r\n\x00\xef\xbb\xbf\xff\xfe"):
        raise InputError(
            f"'{filename}' is empty. Save your label sheet with at least a column of photo "
            "names and a column of labels, then upload it again."
        )
    if data.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        raise InputError(
            f"'{filename}' is an old-style Excel file (.xls) or a password-protected workbook, "
            "which cannot be read here. Open it in Excel, remove any password, and use "
            "File > Save As > 'Excel Workbook (.xlsx)' or 'CSV UTF-8', then upload that file."
        )
    kind = _binary_kind(data)
    if kind is not None:
        raise InputError(
            f"'{filename}' is {kind}, not a label sheet. Upload the spreadsheet that lists "
            "each photo's file name and its label (CSV or Excel .xlsx)."
        )
    if data.startswith(b"PK\x03\x04"):
        rows, numbers = _read_workbook(data, filename=filename)
        return _build_sheet(rows, numbers, filename=filename, encoding=None, delimiter=None)

    try:
        text, encoding = _decode(data, filename=filename)
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
    rows, numbers, delimiter = _parse_text(text, filename=filename)
    return _build_sheet(rows, numbers, filename=filename, encoding=encoding, delimiter=delimiter)


def _binary_kind(data: bytes) -> str | None:
    """Name the kind of a file that is obviously not a sheet (a photo, a PDF...), else None."""
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "a photo (PNG image)"
    if head.startswith(b"\xff\xd8\xff"):
        return "a photo (JPEG image)"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "an image (GIF)"
    if head.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "a photo (WebP image)"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a photo (TIFF image)"
    if data[4:8] == b"ftyp" and data[8:12] in {b"heic", b"heix", b"mif1", b"avif", b"heim"}:
        return "a photo (HEIC/AVIF image)"
    if head.startswith(b"BM") and len(data) > 26 and b"\x00" in data[:64]:
        return "an image (BMP)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith((b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "a compressed archive"
    return None


def _read_workbook(data: bytes, *, filename: str) -> tuple[list[list[str]], list[int]]:
    """Cells of the first non-empty worksheet of an .xlsx/.xlsm, as strings, with row numbers."""
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
            f"'{filename}' is {what}, not an Excel workbook. Save the label sheet as "
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
        for worksheet in sheets:
            rows: list[list[str]] = []
            numbers: list[int] = []
            for number, values in enumerate(worksheet.iter_rows(values_only=True), start=1):
                cells = [_excel_cell_text(v) for v in values]
                if any(cells):
                    rows.append(cells)
                    numbers.append(number)
            if rows:
                return rows, numbers
    finally:
        workbook.close()
    raise InputError(
        f"Every worksheet in '{filename}' is empty. Put the photo names and labels in the first "
        "worksheet and upload it again."
    )


def _excel_cell_text(value: object) -> str:
    """Show an Excel cell the way Excel displays it: 1.0 as "1", TRUE, dates as ISO."""
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
    return _clean_cell(str(value))


def _clean_cell(value: str) -> str:
    return value.strip().strip(_INVISIBLE).strip()


def _decode(data: bytes, *, filename: str) -> tuple[str, str]:
    """Decode text bytes: BOMs first, then UTF-8, Windows-1252 and Latin-1; reject binary."""
    boms = (
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
    )
    candidates: list[tuple[bytes, str]] = []
    for bom, name in boms:
        if data.startswith(bom):
            candidates = [(data[len(bom) :], name)]
            break
    else:
        guessed = _utf16_without_bom(data)
        if guessed:
            candidates.append((data, guessed))
        candidates += [(data, "utf-8"), (data, "cp1252"), (data, "latin-1")]
    for payload, name in candidates:
        try:
            text = payload.decode(name)
        except UnicodeDecodeError:
            continue
        if _looks_binary(text):
            break
        return text, name
    raise InputError(
        f"'{filename}' does not look like a spreadsheet: its content is not readable text. "
        "Upload the label sheet as CSV (comma or semicolon separated) or as an Excel .xlsx file."
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


def _parse_text(text: str, *, filename: str) -> tuple[list[list[str]], list[int], str | None]:
    """Split delimited text into rows of cells; returns rows, their sheet row numbers, delimiter."""
    delimiter = None
    first_line, _, rest = text.partition("\n")
    declared = re.fullmatch(r"\s*sep=(.)\s*", first_line.strip("\r" + _INVISIBLE))
    if declared:  # Excel's "sep=;" line: Excel hides it, so rows are counted without it
        delimiter, text = declared.group(1), rest
    else:
        delimiter = _detect_delimiter(text)
    rows: list[list[str]] = []
    numbers: list[int] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter or _NO_DELIMITER)
    try:
        for number, record in enumerate(reader, start=1):
            cells = [_clean_cell(c) for c in record]
            if any(cells):
                rows.append(cells)
                numbers.append(number)
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
    return rows, numbers, delimiter


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
) -> Sheet:
    """Turn non-empty rows (with their sheet row numbers) into a :class:`Sheet`."""
    if not rows:
        raise InputError(
            f"'{filename}' has no rows with content. Save your label sheet with a column of photo "
            "names and a column of labels, then upload it again."
        )
    # A title line above the table ("Labels for March") is not the header: skip such lines.
    skip = 0
    while skip < min(5, len(rows) - 1):
        filled = [c for c in rows[skip] if c]
        below = sum(1 for c in rows[skip + 1] if c)
        if len(filled) != 1 or not rows[skip][0] or below < 2 or _looks_like_image_ref(filled[0]):
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
            f"'{filename}' has no usable columns. Put the photo names in one column and the "
            "labels in another, then upload it again."
        )
    if has_header and not body:
        raise InputError(
            f"'{filename}' has column names ({', '.join(repr(header[i]) for i in keep)}) but no "
            "rows below them. Add one row per photo, then upload it again."
        )
    names = _unique_names([header[i] if not _is_unnamed(header[i]) else f"Column {_column_letter(i)}" for i in keep])
    frame = pd.DataFrame(
        {name: [r[i] for r in body] for name, i in zip(names, keep, strict=True)},
        index=pd.Index([n - first_data_row for n in body_numbers], dtype="int64"),
        columns=names,
    )
    return Sheet(
        frame=frame,
        filename=filename,
        encoding=encoding,
        delimiter=delimiter,
        has_header=has_header,
        first_data_row=first_data_row,
    )


def _row_looks_like_data(first: list[str], below: list[list[str]]) -> bool:
    """True when the first row is data, not column names (e.g. it starts "123.jpg")."""
    cells = [(i, c) for i, c in enumerate(first) if c]
    if not cells:
        return False
    if any(_looks_like_image_ref(c) for _, c in cells):
        return True
    column_values = [{r[i].casefold() for r in below if i < len(r)} for i in range(len(first))]
    return all(_is_number(c) or c.casefold() in column_values[i] for i, c in cells)


def _is_unnamed(name: str) -> bool:
    return not name or re.fullmatch(r"Unnamed: \d+(_level_\d+)?", name) is not None


def _column_letter(index: int) -> str:
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


def _looks_like_image_ref(value: str) -> bool:
    return bool(_IMAGE_REF_RE.search(value)) or bool(_URL_RE.match(value))


# --------------------------------------------------------------------------- column guessing

_IMAGE_NAMES = frozenset(
    "file files filename file_name image images image_file image_file_name image_filename image_name "
    "imagename image_path image_url img img_name photo photos photo_name photo_file picture path "
    "filepath file_path url link sku asset src".split()
)
_IMAGE_TOKENS = frozenset(
    "file filename image img photo picture pic path url sku foto bild imagen imagem immagine".split()
)
_LABEL_NAMES = frozenset(
    "label labels class classes class_name label_name tag tags category categories has_person "
    "is_person with_person person human people y target annotation on_model".split()
)
_LABEL_TOKENS = frozenset("label class tag category person human people target etiqueta etiquette klasse".split())


def _name_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.casefold()).strip("_")


def _name_hint(name: str, exact: frozenset[str], tokens: frozenset[str]) -> int:
    key = _name_key(name)
    if key in exact:
        return 2
    return 1 if tokens & set(key.split("_")) else 0


def guess_columns(sheet: Sheet) -> tuple[str | None, str | None]:
    """Guess (photo-name column, label column) so the analyst usually just confirms.

    The photo column is the one whose values look like image file names, paths or URLs
    (or, failing that, is named like one); the label column is a different column with few
    distinct values, preferring names like "label"/"class" and coded values like 0/1.
    Either is None when nothing fits.
    """
    frame = sheet.frame
    stats = {}
    for name in frame.columns:
        values = [v for v in frame[name].tolist() if v]
        stats[name] = (
            values,
            sum(map(_looks_like_image_ref, values)) / len(values) if values else 0.0,
            len(set(values)),
        )

    image_col: str | None = None
    by_values = [
        (frac, _name_hint(n, _IMAGE_NAMES, _IMAGE_TOKENS), -pos, n)
        for pos, (n, (_, frac, _)) in enumerate(stats.items())
        if frac >= 0.5
    ]
    if by_values:
        image_col = max(by_values)[3]
    else:
        by_name = [
            (hint, distinct / len(values) if values else 0.0, -pos, n)
            for pos, (n, (values, _, distinct)) in enumerate(stats.items())
            if (hint := _name_hint(n, _IMAGE_NAMES, _IMAGE_TOKENS))
        ]
        if by_name:
            image_col = max(by_name)[3]
        else:
            image_col = next(
                (
                    n
                    for n, (values, _, distinct) in stats.items()
                    if len(values) >= 2 and distinct >= 0.9 * len(values) and not labels_look_coded(set(values))
                ),
                None,
            )

    label_col: str | None = None
    best: tuple | None = None
    rows = max(len(frame), 1)
    for pos, (name, (values, frac, distinct)) in enumerate(stats.items()):
        if name == image_col or not values or frac >= 0.5:
            continue
        hint = _name_hint(name, _LABEL_NAMES, _LABEL_TOKENS)
        # A column named like a label ("Label", "Has person") is trusted up to 100 classes even
        # in a tiny sheet; any other column must repeat its values to look like classes.
        limit = 100 if hint else max(2, min(50, len(values) // 2))
        if distinct > limit:
            continue
        score = (hint * 1.5 + labels_look_coded(set(values)) + len(values) / rows, -distinct, -pos)
        if best is None or score > best:
            best, label_col = score, name
    return image_col, label_col


# --------------------------------------------------------------------------- matching


def _ref_parts(ref: str) -> list[str]:
    """Path components of a photo reference, normalised for matching (see normalise_name)."""
    text = ref.strip().strip(_INVISIBLE)
    if _URL_RE.match(text):
        text = urlsplit(text).path
    else:
        text = _QUERY_AFTER_EXT_RE.sub(r"\1", text)
    text = unquote(text).replace("\\", "/")
    parts = []
    for part in text.split("/"):
        part = part.strip()
        if part in {"", "."}:
            continue
        part = unicodedata.normalize("NFC", unicodedata.normalize("NFC", part).casefold())
        parts.append(part)
    if parts:
        last = parts[-1]
        stem, dot, ext = last.rpartition(".")
        if dot and stem and f".{ext}" in IMAGE_EXTENSIONS:
            last = stem
        elif integral := _INTEGRAL_RE.fullmatch(last):  # SKU typed as a number: "13734.0"
            last = integral.group(1)
        parts[-1] = last
    return parts


def normalise_name(ref: str) -> str:
    """The key that ties a sheet's photo reference to an uploaded file.

    Last component of a path or URL (query/fragment dropped, %-escapes decoded, "\\" treated
    as "/"), Unicode NFC, case-folded, image extension dropped: "Photos\\IMG_001.JPG",
    "img_001.jpeg" and "https://cdn.x.com/a/img_001.jpg?w=200" all give "img_001".
    """
    parts = _ref_parts(ref)
    return parts[-1] if parts else ""


@dataclass
class MatchResult:
    """Labels tied to uploaded photos, plus everything in the sheet that could not be used.

    ``rows_matched`` counts sheet rows whose photo was found among the uploads;
    ``rows_unmatched`` the other rows (photo not uploaded, ambiguous name or no photo name),
    so the two add up to ``rows_total``. ``images_unlabelled`` lists uploaded photos that got
    no label (no row, an empty label or conflicting rows).
    """

    labels: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    rows_total: int = 0
    rows_matched: int = 0
    rows_unmatched: int = 0
    images_unlabelled: list[str] = field(default_factory=list)


def match_labels(
    sheet: Sheet,
    *,
    image_column: str,
    label_column: str,
    image_names: Iterable[str],
) -> MatchResult:
    """Give each uploaded photo its label from the sheet, and report every row that can't.

    Matching ignores case, image extension, folders and URL parts; when two uploaded photos
    share a name in different folders, the row must name the folder too. Duplicated rows are
    counted once; contradicting rows leave the photo unlabelled. Labels differing only in
    capitals/spaces are merged into their most common spelling.
    """
    for column in (image_column, label_column):
        if column not in sheet.frame.columns:
            available = ", ".join(f"'{c}'" for c in sheet.frame.columns)
            raise InputError(f"'{sheet.filename}' has no column named '{column}'. Its columns are: {available}.")
    if image_column == label_column:
        raise InputError(
            f"The photo names and the labels must come from two different columns of "
            f"'{sheet.filename}', but both are set to '{image_column}'."
        )

    uploads = list(dict.fromkeys(image_names))
    by_path: dict[tuple[str, ...], list[str]] = defaultdict(list)
    by_base: dict[str, list[str]] = defaultdict(list)
    upload_parts: dict[str, list[str]] = {}
    for name in uploads:
        parts = _ref_parts(name)
        if not parts:
            continue
        upload_parts[name] = parts
        by_path[tuple(parts)].append(name)
        by_base[parts[-1]].append(name)

    file = sheet.filename
    problems: list[Problem] = []
    refs = sheet.frame[image_column].tolist()
    raw_labels = [_clean_label(v) for v in sheet.frame[label_column].tolist()]
    rows = [sheet.sheet_row(i) for i in sheet.frame.index]
    labels, merge_note = _merge_label_spellings(raw_labels, file=file)

    def warn(kind: str, row: int, message: str) -> None:
        problems.append(Problem(kind, message, file=file, row=row, severity="warning"))

    claims: dict[str, list[tuple[int, str]]] = defaultdict(list)
    matched = 0
    for ref, label, row in zip(refs, labels, rows, strict=True):
        if not ref:
            what = f"a label ('{label}')" if label else "other content"
            warn(
                "empty_image_name",
                row,
                f"Row {row} has {what} but no photo name in column '{image_column}', so it was skipped. "
                "Fill in the photo's file name or delete the row.",
            )
            continue
        candidates = _candidates(_ref_parts(ref), by_path, by_base, upload_parts)
        if len(candidates) > 1:
            listed = ", ".join(f"'{c}'" for c in candidates)
            warn(
                "ambiguous_name",
                row,
                f"Row {row}: '{ref}' could be any of these uploaded photos: {listed}. None of them got this "
                f"row's label. Write the folder too (for example '{candidates[0]}') so it is clear which "
                "photo is meant.",
            )
        elif not candidates:
            warn(
                "missing_photo",
                row,
                f"Row {row}: photo '{ref}' is in the sheet but was not among the uploaded photos. Upload it "
                "too if you want it used, or ignore this message.",
            )
        elif not label:
            matched += 1
            warn(
                "empty_label",
                row,
                f"Row {row} (photo '{ref}') has no label in column '{label_column}'. Fill it in, or the "
                "photo stays unlabelled.",
            )
        else:
            matched += 1
            claims[candidates[0]].append((row, label))

    result: dict[str, str] = {}
    for image, claimed in claims.items():
        distinct = list(dict.fromkeys(label for _, label in claimed))
        if len(distinct) == 1:
            result[image] = distinct[0]
            for row, label in claimed[1:]:
                warn(
                    "duplicate_row",
                    row,
                    f"Row {row} repeats row {claimed[0][0]} (photo '{image}', label '{label}'); it was counted once.",
                )
            continue
        rows_text = _join_rows([row for row, _ in claimed])
        each = ", ".join(f"'{label}' in row {row}" for row, label in claimed)
        problems.append(
            Problem(
                "conflicting_labels",
                f"Photo '{image}' has different labels in {rows_text} ({each}). It was left "
                "unlabelled: keep only the correct row in your sheet, then upload it again.",
                file=file,
                row=claimed[0][0],
                severity="error",
            )
        )

    if merge_note is not None:
        problems.append(merge_note)
    examples = ", ".join(f"'{r}'" for r in [r for r in refs if r][:3])
    if examples and matched == 0 and uploads:
        problems.append(
            Problem(
                "no_matches",
                f"None of the photo names in column '{image_column}' of '{file}' (for example "
                f"{examples}) matches an uploaded photo (for example '{uploads[0]}'). Check that "
                "the right column is chosen for photo names and that you uploaded the right photos.",
                file=file,
                severity="error",
            )
        )
    problems.sort(key=lambda p: (p.row is None, p.row or 0))
    return MatchResult(
        labels=result,
        problems=problems,
        rows_total=len(refs),
        rows_matched=matched,
        rows_unmatched=len(refs) - matched,
        images_unlabelled=[name for name in uploads if name not in result],
    )


def _candidates(
    parts: list[str],
    by_path: Mapping[tuple[str, ...], list[str]],
    by_base: Mapping[str, list[str]],
    upload_parts: Mapping[str, list[str]],
) -> list[str]:
    """Uploaded photos a reference may mean: exact path first, then the longest folder match."""
    if not parts:
        return []
    exact = by_path.get(tuple(parts))
    if exact:
        return exact
    same_base = by_base.get(parts[-1], [])
    if len(same_base) <= 1:
        return list(same_base)

    def shared_tail(name: str) -> int:
        n = 0
        for a, b in zip(reversed(parts), reversed(upload_parts[name]), strict=False):
            if a != b:
                break
            n += 1
        return n

    tails = {name: shared_tail(name) for name in same_base}
    longest = max(tails.values())
    best = [name for name, n in tails.items() if n == longest]
    return best if longest > 1 else list(same_base)


def _clean_label(value: str) -> str:
    value = value.strip()
    integral = _INTEGRAL_RE.fullmatch(value)
    return str(int(integral.group(1))) if integral else value


def _merge_label_spellings(labels: list[str], *, file: str) -> tuple[list[str], Problem | None]:
    """Map labels differing only in capitals/spaces to their most common spelling."""
    counts = Counter(label for label in labels if label)
    groups: dict[str, list[str]] = defaultdict(list)
    for spelling in counts:  # Counter keeps first-seen order
        groups[" ".join(spelling.split()).casefold()].append(spelling)
    mapping: dict[str, str] = {}
    merged = []
    for spellings in groups.values():
        if len(spellings) < 2:
            continue
        winner = max(spellings, key=lambda s: counts[s])  # max keeps the first on ties
        for spelling in spellings:
            mapping[spelling] = winner
        listed = " and ".join(f"'{s}'" for s in spellings)
        merged.append(f"{listed} as '{winner}'")
    if not merged:
        return labels, None
    note = Problem(
        "labels_merged",
        "Some labels differ only in capital letters or spaces and were treated as the same "
        f"label: {'; '.join(merged)}. If they really are different, rename one of them in "
        "the sheet.",
        file=file,
        severity="info",
    )
    return [mapping.get(label, label) for label in labels], note


def _join_rows(rows: list[int]) -> str:
    rows = sorted(set(rows))
    if len(rows) == 1:
        return f"row {rows[0]}"
    return "rows " + ", ".join(map(str, rows[:-1])) + f" and {rows[-1]}"


# --------------------------------------------------------------------------- training checks


MIN_PER_CLASS = 3  # one photo each for testing, validation and training
SMALL_CLASS = 10


def training_blockers(labels: Mapping[str, str], *, min_per_class: int = MIN_PER_CLASS) -> list[Problem]:
    """What stops (errors) or weakens (warnings) training on these photo labels.

    Checks that there are at least two labels, that each has ``min_per_class`` photos (the
    honest split needs one to test, one to validate and one to learn from), warns under
    ``SMALL_CLASS`` photos and under 10 % of the photos, so the analyst can fix it before
    waiting on a run.
    """
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be at least 1, got {min_per_class}")
    counts = Counter(labels.values())
    total = sum(counts.values())
    if total == 0:
        return [
            Problem(
                "no_labels",
                "No photo has a label yet. Upload a label sheet that matches your photos, or "
                "label some photos, before training.",
            )
        ]
    problems: list[Problem] = []
    if len(counts) < 2:
        ((only, _),) = counts.items()
        everything = f"All {total} labelled photos are" if total > 1 else "The only labelled photo is"
        problems.append(
            Problem(
                "single_class",
                f"{everything} '{only}'. The model needs at least two kinds of photo to learn the "
                f"difference: add photos with another label (for example photos that are not "
                f"'{only}').",
            )
        )
    for name, count in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])):
        share = count / total
        if count < min_per_class:
            photos = "photo is" if count == 1 else "photos are"
            problems.append(
                Problem(
                    "too_few_examples",
                    f"Only {count} {photos} labelled '{name}'. Each label needs at least "
                    f"{min_per_class} photos: label {min_per_class - count} more as '{name}', or "
                    "remove this label from the sheet.",
                )
            )
            continue
        if count < SMALL_CLASS:
            problems.append(
                Problem(
                    "small_class",
                    f"Only {count} photos are labelled '{name}'. Training works, but with fewer than "
                    f"{SMALL_CLASS} photos per label the results are shaky: label a few more if you can.",
                    severity="warning",
                )
            )
        if len(counts) >= 2 and share < 0.10:
            problems.append(
                Problem(
                    "class_imbalance",
                    f"Only {count} of {total} labelled photos ({share:.0%}) are '{name}'. The model "
                    f"may rarely predict '{name}'; add more '{name}' photos if you can.",
                    severity="warning",
                )
            )
    return problems


def labels_look_coded(classes: Iterable[str]) -> bool:
    """True when labels are codes (0/1, true/false, yes/no, small integers), not names.

    The UI then asks the analyst what each code means, so results read "person", not "1".
    """
    values = {str(c).strip().casefold() for c in classes}
    values.discard("")
    if not values:
        return False
    for pair in ({"0", "1"}, {"true", "false"}, {"yes", "no"}, {"y", "n"}, {"t", "f"}):
        if values <= pair:
            return True
    return all(re.fullmatch(r"-?\d{1,2}", v) for v in values)


def class_display_defaults(classes: Iterable[str]) -> dict[str, str]:
    """Default display name for each label: the label itself, until the analyst renames it."""
    return {c: c for c in classes}
