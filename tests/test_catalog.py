"""Catalog reading: real-looking exports, column guessing, photo references, local files."""

from __future__ import annotations

import io
import os

import pytest
from openpyxl import Workbook

from core.base.problems import InputError
from core.inputs.catalog import ImageRef, catalog_of, image_refs, read_catalog, ref_kind, resolve_local, split_cell
from core.inputs.sheets import read_sheet

SHOPIFY = (
    b"Handle,Title,Variant SKU,Image Src,Image Position,Image Alt Text\n"
    b"red-shirt,Red shirt,RS-1,https://cdn.shopify.com/s/files/red-1.jpg?v=1,1,\n"
    b"red-shirt,,,https://cdn.shopify.com/s/files/red-2.jpg?v=1,2,\n"
    b"blue-cap,Blue cap,BC-1,https://cdn.shopify.com/s/files/cap.png,1,\n"
    b"blue-cap,,BC-2,,,\n"
)

GOOGLE = (
    b"id\ttitle\tprice\timage_link\tadditional_image_link\n"
    b"A1\tShirt\t10 EUR\thttps://x.com/a1.jpg\thttps://x.com/a1-b.jpg,https://x.com/a1-c.jpg\n"
    b"A2\tCap\t5 EUR\thttps://x.com/a2.jpg\t\n"
)

CP1252 = (
    "Artikelnummer;Bezeichnung;Bild\n12345;Größe M Hemd;Photos\\12345.JPG\n12346;Café Tasse;Photos\\12346.JPG\n".encode(
        "cp1252"
    )
)


def _xlsx() -> bytes:
    wb = Workbook()
    ws = wb.active
    ws.append(["product_id", "name", "image_1", "image_2", "image_3"])
    ws.append(["P-1", "Sofa", "sofa_front.jpg", "sofa_side.jpg", None])
    ws.append(["P-2", "Lamp", "lamp.png", None, None])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


def test_shopify_export_is_long_format():
    cat = read_catalog(SHOPIFY, filename="products_export.csv")
    assert (cat.id_column, cat.image_columns, cat.long_format, cat.row_count) == ("Handle", ["Image Src"], True, 4)
    assert list(cat.sheet.frame.columns) == [
        "Handle",
        "Title",
        "Variant SKU",
        "Image Src",
        "Image Position",
        "Image Alt Text",
    ]
    refs = list(image_refs(cat))
    assert [(r.row, r.sheet_row, r.position, r.kind) for r in refs] == [
        (0, 2, 1, "url"),
        (1, 3, 2, "url"),
        (2, 4, 1, "url"),
        (3, 5, 0, "empty"),
    ]


def test_google_feed_splits_additional_links():
    cat = read_catalog(GOOGLE, filename="feed.tsv")
    assert (cat.id_column, cat.image_columns, cat.long_format) == ("id", ["image_link", "additional_image_link"], False)
    refs = list(image_refs(cat))
    assert [(r.sheet_row, r.column, r.position, r.value) for r in refs if r.kind == "url"] == [
        (2, "image_link", 1, "https://x.com/a1.jpg"),
        (2, "additional_image_link", 2, "https://x.com/a1-b.jpg"),
        (2, "additional_image_link", 3, "https://x.com/a1-c.jpg"),
        (3, "image_link", 1, "https://x.com/a2.jpg"),
    ]
    assert refs[-1] == ImageRef(1, 3, "additional_image_link", 0, "", "empty")


def test_pim_workbook_with_empty_image_cells():
    cat = read_catalog(_xlsx(), filename="pim.xlsx")
    assert (cat.id_column, cat.image_columns) == ("product_id", ["image_1", "image_2", "image_3"])
    refs = list(image_refs(cat))
    assert [(r.row, r.column, r.kind) for r in refs] == [
        (0, "image_1", "name"),
        (0, "image_2", "name"),
        (0, "image_3", "empty"),
        (1, "image_1", "name"),
        (1, "image_2", "empty"),
        (1, "image_3", "empty"),
    ]


def test_cp1252_semicolon_with_backslash_paths():
    cat = read_catalog(CP1252, filename="export.csv")
    assert (cat.id_column, cat.image_columns) == ("Artikelnummer", ["Bild"])
    assert cat.sheet.frame.loc[0, "Bezeichnung"] == "Größe M Hemd"
    assert [(r.value, r.kind) for r in image_refs(cat)] == [
        ("Photos\\12345.JPG", "path"),
        ("Photos\\12346.JPG", "path"),
    ]


def test_no_photo_column_is_a_plain_error():
    with pytest.raises(InputError, match="No column in 'x.csv'"):
        read_catalog(b"sku,title\n1,a\n2,b\n", filename="x.csv")


def test_ref_kind():
    assert [ref_kind(v) for v in ["", " ", "https://a/b.jpg", "a/b.jpg", "C:\\x.jpg", "b.jpg"]] == [
        "empty",
        "empty",
        "url",
        "path",
        "path",
        "name",
    ]


def _ref(value: str) -> ImageRef:
    return ImageRef(0, 2, "Bild", 1, value, ref_kind(value))


def test_resolve_local_by_name(tmp_path):
    z = {"Export/PHOTOS/12345.jpeg": tmp_path / "a.jpeg", "other.png": tmp_path / "o.png"}
    assert resolve_local(_ref("Photos\\12345.JPG"), zip_names=z) == tmp_path / "a.jpeg"
    assert resolve_local(_ref("12345.jpg"), project_names={"12345.JPG": tmp_path / "p.jpg"}) == tmp_path / "p.jpg"
    assert resolve_local(_ref("missing.jpg"), zip_names=z) is None
    assert resolve_local(_ref("https://x.com/12345.jpg"), zip_names=z) is None


def test_resolve_local_stays_inside_allowed_root(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "leak.jpg")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "sub" / "a.jpg", root / "alias.jpg")
    roots = [root]
    assert resolve_local(_ref("sub\\a.jpg"), allowed_roots=roots) == (root / "sub" / "a.jpg").resolve()
    assert resolve_local(_ref(str(root / "sub" / "a.jpg")), allowed_roots=roots) is not None
    assert resolve_local(_ref("alias.jpg"), allowed_roots=roots) == (root / "sub" / "a.jpg").resolve()
    assert resolve_local(_ref("../secret.jpg"), allowed_roots=roots) is None
    assert resolve_local(_ref("sub/../../secret.jpg"), allowed_roots=roots) is None
    assert resolve_local(_ref("leak.jpg"), allowed_roots=roots) is None
    assert resolve_local(_ref("up/secret.jpg"), allowed_roots=roots) is None
    assert resolve_local(_ref(str(tmp_path / "secret.jpg")), allowed_roots=roots) is None
    assert resolve_local(_ref("sub/a.jpg")) is None  # no roots configured


def test_split_cell_splits_only_lists_of_photos():
    assert split_cell(" front.jpg, back.JPG ") == ["front.jpg", "back.JPG"]
    assert split_cell("https://x.com/a.jpg,https://x.com/b.png?v=2") == ["https://x.com/a.jpg", "https://x.com/b.png?v=2"]
    assert split_cell("shirt, red.jpg") == ["shirt, red.jpg"]  # a file name with a comma in it
    assert split_cell("  ") == []


def test_catalog_of_a_sheet_keeps_the_analysts_photo_columns_and_names_a_missing_one():
    sheet = read_sheet(SHOPIFY, filename="products_export.csv")
    cat = catalog_of(sheet, image_columns=["Image Alt Text"])  # chosen, even if it holds no photo names
    assert (cat.image_columns, cat.id_column, cat.long_format) == (["Image Alt Text"], "Handle", True)
    assert catalog_of(sheet).image_columns == ["Image Src"]
    with pytest.raises(InputError, match=r"'products_export.csv' has no column 'Photo'.*Its columns: Handle, Title"):
        catalog_of(sheet, image_columns=["Photo"])


def test_raw_cells_come_back_as_written_below_the_header():
    data = b"sep=;\r\nsku;title;image;\r\nA1; Shirt ;a.jpg\r\n\r\nA2;Mug;b.jpg;;x\r\n;;;\r\n\r\n"
    sheet = read_sheet(data, filename="export.csv", keep_raw=True)
    assert list(sheet.frame.columns) == ["sku", "title", "image", "Column E"]
    assert sheet.raw_header == ["sku", "title", "image", "", ""]  # the sep= line is no row
    assert sheet.raw_rows == [["A1", " Shirt ", "a.jpg", "", ""], ["", "", "", "", ""], ["A2", "Mug", "b.jpg", "", "x"]]
    assert list(sheet.frame.index) == [0, 2]  # index label i is raw_rows[i]
    assert sheet.frame.loc[0, "title"] == "Shirt"
    assert read_sheet(data, filename="export.csv").raw_rows is None  # only when asked for


def test_raw_cells_of_a_workbook_with_a_title_line_and_no_header():
    wb = Workbook()
    ws = wb.active
    for row in (["Spring 2024"], [None], ["a.jpg", 1, " red "], [None, None, None], ["b.jpg", 2.5, None]):
        ws.append(row)
    buf = io.BytesIO()
    wb.save(buf)
    sheet = read_sheet(buf.getvalue(), filename="spring.xlsx", keep_raw=True)
    assert not sheet.has_header and sheet.raw_header is None and sheet.first_data_row == 3
    assert sheet.raw_rows == [["a.jpg", "1", " red "], ["", "", ""], ["b.jpg", "2.5", ""]]
    assert sheet.frame.loc[2, "Column B"] == "2.5" and sheet.frame.loc[0, "Column C"] == "red"
