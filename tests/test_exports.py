"""Every spreadsheet handed out: no cell runs as a formula, Excel's row limit, Parquet."""

from __future__ import annotations

import csv
import io
import zipfile

import openpyxl
import pandas as pd
import pytest

from core.base import exports

HOSTILE = [
    "=1+1",
    '=HYPERLINK("http://evil.example/x","Click me")',
    "@SUM(A1:A2)",
    "+cmd|' /C calc'!A0",
    "-2+3",
    "\t=1+1",
    "\r=1+1",
    "=",
]
HARMLESS = ["-2", "+3.5", "-1,5", "1e-3", "-", "", "plain text", "a=b", " =1+1"]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_csv_cell_that_could_run_as_a_formula_gets_an_apostrophe(value):
    assert exports.neutralise(value) == "'" + value


@pytest.mark.parametrize("value", [v for v in HARMLESS if v != "-"])
def test_numbers_and_plain_text_stay_as_they_are(value):
    assert exports.neutralise(value) == value


def test_a_lone_minus_is_not_a_number_and_is_neutralised():
    assert exports.neutralise("-") == "'-"


def _table() -> pd.DataFrame:
    frame = pd.DataFrame({"catalog": HOSTILE + HARMLESS, "confidence": [0.5] * (len(HOSTILE) + len(HARMLESS))})
    frame.columns = ["=HEADER()", "confidence"]
    return frame


def test_csv_read_back_has_every_risky_cell_neutralised_header_included():
    rows = list(csv.reader(io.StringIO(exports.csv_bytes(_table()).decode("utf-8-sig"), newline="")))
    assert rows[0] == ["'=HEADER()", "confidence"]
    cells = [r[0] for r in rows[1:]]
    assert cells[: len(HOSTILE)] == ["'" + v for v in HOSTILE]
    assert cells[len(HOSTILE) :] == [exports.neutralise(v) for v in HARMLESS]
    assert {r[1] for r in rows[1:]} == {"0.5"}  # numbers stay numbers


def test_xlsx_text_cells_are_text_never_formulas():
    data = exports.xlsx_bytes(_table())
    sheet = openpyxl.load_workbook(io.BytesIO(data)).active
    assert sheet.cell(1, 1).value == "=HEADER()" and sheet.cell(1, 1).data_type == "s"
    cells = [sheet.cell(r, 1) for r in range(2, sheet.max_row + 1)]
    # exactly as written (XML reads a carriage return back as a line feed)
    assert [c.value or "" for c in cells] == [v.replace("\r", "\n") for v in HOSTILE + HARMLESS]
    assert all(c.data_type == "s" for c in cells if c.value is not None)
    assert {sheet.cell(r, 2).value for r in range(2, sheet.max_row + 1)} == {0.5}
    with zipfile.ZipFile(io.BytesIO(data)) as book:
        xml = book.read("xl/worksheets/sheet1.xml").decode()
    assert "<f>" not in xml and "<f " not in xml


def test_excel_refuses_a_table_longer_than_excel_holds_and_offers_csv_or_parquet():
    frame = pd.DataFrame({"sku": range(exports.EXCEL_MAX_ROWS)})  # one more row than fits under the header
    with pytest.raises(exports.TooManyRowsError, match=r"1,048,576 rows.*CSV or Parquet"):
        exports.xlsx_bytes(frame)
    assert len(pd.read_parquet(io.BytesIO(exports.parquet_bytes(frame)))) == exports.EXCEL_MAX_ROWS


def test_parquet_keeps_values_and_names_repeated_columns_apart():
    frame = pd.DataFrame([["=1+1", "a", 0.25]], columns=["image", "image", "confidence"])
    back = pd.read_parquet(io.BytesIO(exports.parquet_bytes(frame)))
    assert list(back.columns) == ["image", "image (2)", "confidence"]
    assert back.iloc[0].tolist() == ["=1+1", "a", 0.25]


def test_format_follows_the_file_name(tmp_path):
    assert [exports.format_of(n) for n in ("a.csv", "a.XLSX", "a.parquet", "a.tsv")] == [
        "csv",
        "xlsx",
        "parquet",
        "csv",
    ]
    out = exports.write_table(_table(), tmp_path / "t.parquet")
    assert pd.read_parquet(out).iloc[0, 0] == "=1+1"
