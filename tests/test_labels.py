"""Tests for core.inputs.labels: reading label sheets, guessing columns, matching rows to photos."""

from __future__ import annotations

import io
from pathlib import Path

import openpyxl
import pytest

from core.base.problems import InputError, Problem
from core.inputs.columns import guess_columns, labels_look_coded
from core.inputs.labels import (
    MatchResult,
    Sheet,
    class_display_defaults,
    match_labels,
    normalise_name,
    read_sheet,
    training_blockers,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = REPO_ROOT.parent / "shared" / "data" / "product-photos"


def kinds(problems: list[Problem]) -> list[str]:
    return [p.kind for p in problems]


def records(sheet: Sheet) -> list[list[str]]:
    return sheet.frame.values.tolist()


def match(sheet: Sheet, names: list[str]) -> MatchResult:
    image_col, label_col = guess_columns(sheet)
    return match_labels(sheet, image_column=image_col, label_column=label_col, image_names=names)


# --------------------------------------------------------------------------- reading formats


def test_comma_csv() -> None:
    sheet = read_sheet(b"file,label\na.jpg,person\nb.jpg,no_person\n", filename="l.csv")
    assert sheet.delimiter == ","
    assert sheet.encoding == "utf-8"
    assert sheet.has_header and sheet.first_data_row == 2
    assert list(sheet.frame.columns) == ["file", "label"]
    assert records(sheet) == [["a.jpg", "person"], ["b.jpg", "no_person"]]
    assert guess_columns(sheet) == ("file", "label")


def test_semicolon_with_trailing_empty_columns_and_coded_labels() -> None:
    data = b"image_file_name;label;;;\r\n13734.jpg;1;;;\r\n10140.jpg;0;;;\r\n17608.jpg;0\r\n;;;;\r\n"
    sheet = read_sheet(data, filename="parfois.csv")
    assert sheet.delimiter == ";"
    assert list(sheet.frame.columns) == ["image_file_name", "label"]
    assert records(sheet) == [["13734.jpg", "1"], ["10140.jpg", "0"], ["17608.jpg", "0"]]
    assert guess_columns(sheet) == ("image_file_name", "label")
    assert labels_look_coded(set(sheet.frame["label"]))


def test_tab_separated() -> None:
    sheet = read_sheet(b"photo\tclass\tnote\na.jpg\tperson\tx, y\nb.jpg\tbag\t\n", filename="l.tsv")
    assert sheet.delimiter == "\t"
    assert records(sheet) == [["a.jpg", "person", "x, y"], ["b.jpg", "bag", ""]]
    assert guess_columns(sheet) == ("photo", "class")


def test_pipe_separated() -> None:
    sheet = read_sheet(b"img|tag\na.png|yes\nb.png|no\n", filename="l.txt")
    assert sheet.delimiter == "|"
    assert records(sheet) == [["a.png", "yes"], ["b.png", "no"]]


def test_quoted_fields_containing_commas_and_quotes() -> None:
    data = b'file,label,note\n"a.jpg",person,"red, blue"\nb.jpg,"no_person","say ""hi"", ok"\n'
    sheet = read_sheet(data, filename="l.csv")
    assert sheet.delimiter == ","
    assert records(sheet) == [
        ["a.jpg", "person", "red, blue"],
        ["b.jpg", "no_person", 'say "hi", ok'],
    ]


def test_utf8_bom_does_not_leak_into_first_column_name() -> None:
    sheet = read_sheet("\ufefffile;label\nçà.jpg;1\n".encode(), filename="l.csv")
    assert sheet.encoding == "utf-8-sig"
    assert list(sheet.frame.columns) == ["file", "label"]
    assert records(sheet) == [["çà.jpg", "1"]]


@pytest.mark.parametrize(("bom", "codec"), [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")])
def test_utf16_with_bom(bom: bytes, codec: str) -> None:
    data = bom + "file\tlabel\r\nphoto é.jpg\tperson\r\n".encode(codec)
    sheet = read_sheet(data, filename="unicode.txt")
    assert sheet.encoding == codec
    assert sheet.delimiter == "\t"
    assert records(sheet) == [["photo é.jpg", "person"]]


def test_cp1252_with_accents_and_euro() -> None:
    data = "fichier;étiquette;prix\ncafé.jpg;personne;5€\nthé.jpg;sac;7€\n".encode("cp1252")
    sheet = read_sheet(data, filename="windows.csv")
    assert sheet.encoding == "cp1252"
    assert list(sheet.frame.columns) == ["fichier", "étiquette", "prix"]
    assert records(sheet)[0] == ["café.jpg", "personne", "5€"]


def test_latin1_fallback() -> None:
    data = b"file,label\nna\xefve\x81.jpg,person\n"  # 0x81 is undefined in cp1252
    sheet = read_sheet(data, filename="old.csv")
    assert sheet.encoding == "latin-1"
    assert records(sheet) == [["na\xefve\x81.jpg", "person"]]


def test_excel_sep_line_is_honoured_and_not_counted_as_a_row() -> None:
    sheet = read_sheet(b"sep=;\r\nfile;label\r\na.jpg;1,5\r\n", filename="l.csv")
    assert sheet.delimiter == ";"
    assert sheet.first_data_row == 2
    assert records(sheet) == [["a.jpg", "1,5"]]


def test_xlsx_numbers_shown_like_excel_and_empty_first_sheet_skipped(tmp_path: Path) -> None:
    workbook = openpyxl.Workbook()
    workbook.active.title = "Notes"  # empty first sheet
    ws = workbook.create_sheet("Labels")
    ws.append([])
    ws.append(["SKU", "Has person", None])
    ws.append([13734, 1.0, None])
    ws.append([None, None, None])
    ws.append([10140.0, 0, None])
    ws.append(["12569.jpg", True, None])
    path = tmp_path / "labels.xlsx"
    workbook.save(path)

    for source in (path, path.read_bytes()):
        sheet = read_sheet(source, filename="labels.xlsx")
        assert sheet.encoding is None and sheet.delimiter is None
        assert list(sheet.frame.columns) == ["SKU", "Has person"]
        assert records(sheet) == [["13734", "1"], ["10140", "0"], ["12569.jpg", "TRUE"]]
        assert sheet.first_data_row == 3
        assert [sheet.sheet_row(i) for i in sheet.frame.index] == [3, 5, 6]
        assert guess_columns(sheet) == ("SKU", "Has person")


def test_xls_is_refused_with_save_as_advice() -> None:
    data = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
    with pytest.raises(InputError, match=r"\.xlsx"):
        read_sheet(data, filename="labels.xls")


def test_headerless_csv_gets_letter_columns() -> None:
    sheet = read_sheet(b"123.jpg,person\n124.jpg,bag\n125.jpg,person\n", filename="l.csv")
    assert not sheet.has_header
    assert sheet.first_data_row == 1
    assert list(sheet.frame.columns) == ["Column A", "Column B"]
    assert len(sheet.frame) == 3
    assert guess_columns(sheet) == ("Column A", "Column B")


def test_headerless_csv_of_numbers() -> None:
    sheet = read_sheet(b"13734;1\n10140;0\n17608;0\n", filename="l.csv")
    assert not sheet.has_header
    assert records(sheet)[0] == ["13734", "1"]
    assert guess_columns(sheet) == ("Column A", "Column B")


def test_unnamed_empty_columns_dropped_but_unnamed_data_kept() -> None:
    data = b"file,label,Unnamed: 2,,\na.jpg,1,,,x\nb.jpg,0,,,\n\n"
    sheet = read_sheet(data, filename="pandas_export.csv")
    assert list(sheet.frame.columns) == ["file", "label", "Column E"]
    assert records(sheet) == [["a.jpg", "1", "x"], ["b.jpg", "0", ""]]


def test_title_line_above_the_table_is_skipped() -> None:
    sheet = read_sheet(b"Labels for March\n\nfile,label\na.jpg,1\nb.jpg,0\n", filename="l.csv")
    assert list(sheet.frame.columns) == ["file", "label"]
    assert sheet.first_data_row == 4


def test_old_mac_line_endings_and_utf16_without_bom() -> None:
    sheet = read_sheet(b"file;label\ra.jpg;1\rb.jpg;0\r", filename="mac.csv")
    assert records(sheet) == [["a.jpg", "1"], ["b.jpg", "0"]]
    sheet = read_sheet("file\tlabel\r\na.jpg\tperson\r\n".encode("utf-16-le"), filename="l.txt")
    assert sheet.encoding == "utf-16-le"
    assert records(sheet) == [["a.jpg", "person"]]


def test_headerless_with_bare_skus_and_word_labels() -> None:
    sheet = read_sheet(b"13734,person\n10140,bag\n17608,person\n", filename="l.csv")
    assert not sheet.has_header
    assert len(sheet.frame) == 3


def test_stray_quote_is_reported_with_its_row() -> None:
    data = b'file,label\na.jpg,1\n"b.jpg,person\nc.jpg,bag\nd.jpg,bag\n'
    with pytest.raises(InputError, match=r"Row 3 of 'l\.csv' .*opens a quotation mark"):
        read_sheet(data, filename="l.csv")
    huge = b"file,label\n" + b"a.jpg,1\n" * 5 + b'b.jpg,"' + b"x" * 200_000 + b"\n"
    with pytest.raises(InputError, match="quotation mark"):
        read_sheet(huge, filename="l.csv")
    multi_line_note = b'file,label,note\na.jpg,1,"line one, a\nline two"\n'
    assert records(read_sheet(multi_line_note, filename="l.csv"))[0][2] == "line one, a\nline two"


def test_web_page_saved_as_xls_is_refused() -> None:
    with pytest.raises(InputError, match="web page"):
        read_sheet(b"<html><table><tr><td>a.jpg</td></tr></table></html>", filename="l.xls")


def test_blank_lines_keep_spreadsheet_row_numbers() -> None:
    sheet = read_sheet(b"file,label\r\na.jpg,1\r\n\r\n,\r\nb.jpg,0\r\n", filename="l.csv")
    assert [sheet.sheet_row(i) for i in sheet.frame.index] == [2, 5]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\xef\xbb\xbf\r\n  \r\n", "empty"),
        (b";;;\r\n;;;\r\n", "no rows"),
        (b"file,label\n", "no rows below"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "photo"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(300), "photo"),
        (bytes(range(256)) * 8, "not readable text"),
        (b"PK\x03\x04" + bytes(100), "damaged"),
        # What the file is, said by the one owner of file signatures (core.inputs.filekinds):
        (b"8BPS\x00\x01" + bytes(200), "a Photoshop file"),
        (b"\x00\x00\x00\x18ftypmp42" + bytes(200), "a video or audio file"),
        (b"MZ\x90\x00\x03" + bytes(200), "a program"),
        (b"BZh91AY&SY" + bytes(range(200)), "a compressed archive"),
        (b"%PDF-1.7\n" + bytes(200), "a PDF document"),
    ],
)
def test_unusable_files_raise_plain_input_errors(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        read_sheet(data, filename="labels.csv")
    assert "'labels.csv'" in str(caught.value)


def test_zip_of_photos_is_not_a_sheet() -> None:
    buffer = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.jpg", b"\xff\xd8\xff")
    with pytest.raises(InputError, match="zip archive"):
        read_sheet(buffer.getvalue(), filename="photos.zip")


def test_read_from_path(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_bytes(b"file,label\na.jpg,1\n")
    assert records(read_sheet(path, filename="l.csv")) == [["a.jpg", "1"]]


# --------------------------------------------------------------------------- guessing


def test_guess_prefers_named_label_over_other_binary_column() -> None:
    sheet = read_sheet(
        b"file,label,partial_body\na.jpg,person,0\nb.jpg,no_person,1\nc.jpg,person,0\nd.jpg,no_person,0\n",
        filename="l.csv",
    )
    assert guess_columns(sheet) == ("file", "label")


def test_guess_finds_image_column_by_values_not_position() -> None:
    data = b"id,category,url\n1,person,https://cdn.x.com/a/1.jpg?w=2\n2,bag,https://cdn.x.com/a/2.jpg\n"
    sheet = read_sheet(data, filename="l.csv")
    assert guess_columns(sheet) == ("url", "category")


def test_guess_falls_back_to_a_unique_column_and_gives_up_when_nothing_fits() -> None:
    sheet = read_sheet(b"ref,group\nA-1,x\nA-2,y\nA-3,x\nA-4,y\n", filename="l.csv")
    assert guess_columns(sheet) == ("ref", "group")
    sheet = read_sheet(
        b"a,b\nx1,long text one\nx1,long text one\nx2,long text two\nx2,long text two\n", filename="l.csv"
    )
    assert guess_columns(sheet)[0] is None


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    "ref",
    [
        "Photos\\IMG_001.JPG",
        "img_001.jpeg",
        "https://cdn.x.com/a/img_001.jpg?w=200",
        "shoes/img_001.jpg",
        " IMG_001 ",
        "file:///C:/Users/me/img%5F001.png#frag",
        "img_001.jpg?v=3",
    ],
)
def test_normalise_name(ref: str) -> None:
    assert normalise_name(ref) == "img_001"


def test_every_photo_type_the_app_decodes_is_a_photo_name_in_a_sheet() -> None:
    """One list owns photo extensions: a sheet naming `scan_7` labels the uploaded `scan_7.dib`
    (the sheet reader kept its own list, without .dib, so the two did not match), and a
    phone's .heic is a photo name even where its decoder is missing."""
    from core.inputs.images import IMAGE_EXTENSIONS, PHOTO_NAME_EXTENSIONS
    from core.inputs.sheets import looks_like_image_ref

    assert IMAGE_EXTENSIONS <= PHOTO_NAME_EXTENSIONS and {".heic", ".avif"} <= PHOTO_NAME_EXTENSIONS
    for ext in PHOTO_NAME_EXTENSIONS:
        assert normalise_name(f"Scan_7{ext.upper()}") == "scan_7" and looks_like_image_ref(f"scan_7{ext}")
    sheet = read_sheet(b"photo,label\nscan_7,person\nscan_8,no person\n", filename="labels.csv")
    result = match_labels(sheet, image_column="photo", label_column="label", image_names=["scan_7.dib", "scan_8.bmp"])
    assert result.labels == {"scan_7.dib": "person", "scan_8.bmp": "no person"}


def test_normalise_name_unicode_forms_and_numbers() -> None:
    assert normalise_name("Cafe\u0301.JPG") == normalise_name("café.jpg") == "café"
    assert normalise_name("13734.0") == "13734"
    assert normalise_name("report.pdf") == "report.pdf"


def test_matching_ignores_case_extension_folder_and_url() -> None:
    data = b"file;label\nPhotos\\IMG_001.JPG;Person\nhttps://cdn.x.com/a/img_002.jpg?w=200;bag\nIMG_003.jpeg;1.0\n"
    sheet = read_sheet(data, filename="l.csv")
    names = ["shoes/img_001.jpg", "bags/img_002.png", "img_003.jpg", "img_004.jpg"]
    result = match(sheet, names)
    assert result.labels == {"shoes/img_001.jpg": "Person", "bags/img_002.png": "bag", "img_003.jpg": "1"}
    assert result.images_unlabelled == ["img_004.jpg"]
    assert (result.rows_total, result.rows_matched, result.rows_unmatched) == (3, 3, 0)
    assert result.problems == []


def test_same_name_in_two_folders_is_ambiguous_unless_folder_given() -> None:
    sheet = read_sheet(b"file,label\nimg_001.jpg,person\nbags/IMG_001.jpg,bag\n", filename="l.csv")
    result = match(sheet, ["shoes/img_001.jpg", "bags/img_001.jpg"])
    assert result.labels == {"bags/img_001.jpg": "bag"}
    (problem,) = result.problems
    assert problem.kind == "ambiguous_name" and problem.row == 2
    assert "shoes/img_001.jpg" in problem.message and "bags/img_001.jpg" in problem.message
    assert result.images_unlabelled == ["shoes/img_001.jpg"]
    assert result.rows_unmatched == 1


def test_exact_relative_path_wins_over_deeper_folder() -> None:
    sheet = read_sheet(b"file,label\nshoes/a.jpg,1\nC:\\Users\\me\\x\\shoes\\a.jpg,0\n", filename="l.csv")
    result = match(sheet, ["shoes/a.jpg", "x/shoes/a.jpg"])
    assert result.labels == {"shoes/a.jpg": "1", "x/shoes/a.jpg": "0"}
    assert result.problems == []


def test_duplicate_rows_counted_once() -> None:
    sheet = read_sheet(b"file,label\na.jpg,person\nb.jpg,bag\nA.JPG,person\n", filename="l.csv")
    result = match(sheet, ["a.jpg", "b.jpg"])
    assert result.labels == {"a.jpg": "person", "b.jpg": "bag"}
    (problem,) = result.problems
    assert (problem.kind, problem.row, problem.severity) == ("duplicate_row", 4, "warning")
    assert "row 2" in problem.message


def test_conflicting_labels_name_both_rows_and_leave_photo_unlabelled() -> None:
    data = b"file,label\na.jpg,person\nb.jpg,bag\nc.jpg,bag\nd.jpg,bag\ne.jpg,bag\nA.png,bag\n"
    sheet = read_sheet(data, filename="l.csv")
    result = match(sheet, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    assert "a.jpg" not in result.labels
    assert "a.jpg" in result.images_unlabelled
    (problem,) = result.problems
    assert (problem.kind, problem.severity, problem.row) == ("conflicting_labels", "error", 2)
    assert "rows 2 and 7" in problem.message
    assert "'person' in row 2" in problem.message and "'bag' in row 7" in problem.message


def test_conflict_between_rows_3_and_7() -> None:
    data = b"file,label\nx.jpg,1\na.jpg,1\ny.jpg,0\nz.jpg,0\nw.jpg,1\na.jpg,0\n"
    result = match(read_sheet(data, filename="l.csv"), ["a.jpg", "x.jpg"])
    conflicts = [p for p in result.problems if p.kind == "conflicting_labels"]
    assert len(conflicts) == 1 and "rows 3 and 7" in conflicts[0].message


def test_missing_photos_one_warning_per_row() -> None:
    sheet = read_sheet(b"file,label\na.jpg,1\nb.jpg,0\nc.jpg,0\n", filename="l.csv")
    result = match(sheet, ["a.jpg"])
    missing = [p for p in result.problems if p.kind == "missing_photo"]
    assert [p.row for p in missing] == [3, 4]
    assert all(p.severity == "warning" and p.file == "l.csv" for p in missing)
    assert (result.rows_matched, result.rows_unmatched) == (1, 2)


def test_unlabelled_images_listed_not_reported_one_by_one() -> None:
    sheet = read_sheet(b"file,label\na.jpg,1\n", filename="l.csv")
    result = match(sheet, ["a.jpg", "b.jpg", "sub/c.jpg"])
    assert result.images_unlabelled == ["b.jpg", "sub/c.jpg"]
    assert result.problems == []


def test_empty_cells_are_warnings_with_row_numbers() -> None:
    sheet = read_sheet(b"file,label,note\na.jpg,,x\n,person,y\nb.jpg,bag,\n", filename="l.csv")
    result = match_labels(sheet, image_column="file", label_column="label", image_names=["a.jpg", "b.jpg"])
    assert [(p.kind, p.row, p.severity) for p in result.problems] == [
        ("empty_label", 2, "warning"),
        ("empty_image_name", 3, "warning"),
    ]
    assert result.labels == {"b.jpg": "bag"}


def test_labels_differing_in_case_are_merged_to_most_common_spelling() -> None:
    data = b"file,label\na.jpg,person\nb.jpg,Person \nc.jpg,person\nd.jpg,no_person\ne.jpg,PERSON\n"
    result = match(read_sheet(data, filename="l.csv"), ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    assert set(result.labels.values()) == {"person", "no_person"}
    assert result.labels["b.jpg"] == "person"
    (note,) = result.problems
    assert note.kind == "labels_merged" and note.severity == "info"
    assert "'Person'" in note.message and "'PERSON'" in note.message


def test_same_label_in_other_case_for_same_photo_is_a_duplicate_not_a_conflict() -> None:
    data = b"file,label\na.jpg,person\na.jpg,Person\nb.jpg,person\n"
    result = match(read_sheet(data, filename="l.csv"), ["a.jpg", "b.jpg"])
    assert result.labels == {"a.jpg": "person", "b.jpg": "person"}
    assert sorted(kinds(result.problems)) == ["duplicate_row", "labels_merged"]


def test_wrong_column_reports_that_nothing_matched() -> None:
    sheet = read_sheet(b"file,label\na.jpg,1\nb.jpg,0\n", filename="l.csv")
    result = match_labels(sheet, image_column="label", label_column="file", image_names=["a.jpg", "b.jpg"])
    assert "no_matches" in kinds(result.problems)
    assert result.rows_matched == 0


def test_unknown_or_identical_columns_raise() -> None:
    sheet = read_sheet(b"file,label\na.jpg,1\n", filename="l.csv")
    with pytest.raises(InputError, match="'file', 'label'"):
        match_labels(sheet, image_column="photo", label_column="label", image_names=[])
    with pytest.raises(InputError, match="two different columns"):
        match_labels(sheet, image_column="file", label_column="file", image_names=[])


# --------------------------------------------------------------------------- training checks


def test_single_class_blocks_training() -> None:
    (problem,) = training_blockers({f"{i}.jpg": "person" for i in range(480)})
    assert problem.severity == "error"
    assert problem.message.startswith("All 480 labelled photos are 'person'.")


def test_too_few_photos_in_a_class() -> None:
    labels = {f"d{i}.jpg": "dog" for i in range(20)} | {f"c{i}.jpg": "cat" for i in range(3)}
    problems = training_blockers(labels, min_per_class=5)
    assert kinds(problems) == ["too_few_examples"]
    assert "Only 3 photos are labelled 'cat'" in problems[0].message
    assert "2 more" in problems[0].message


def test_imbalance_is_a_warning() -> None:
    labels = {f"d{i}.jpg": "dog" for i in range(94)} | {f"c{i}.jpg": "cat" for i in range(6)}
    small, problem = training_blockers(labels)
    assert (small.kind, small.severity) == ("small_class", "warning")
    assert (problem.kind, problem.severity) == ("class_imbalance", "warning")
    assert "6 of 100" in problem.message


def test_two_photos_of_a_class_refuse_training_and_nine_warn() -> None:
    two = {f"d{i}.jpg": "dog" for i in range(20)} | {f"c{i}.jpg": "cat" for i in range(2)}
    assert [(p.kind, p.severity) for p in training_blockers(two) if p.severity == "error"] == [
        ("too_few_examples", "error")]
    nine = {f"d{i}.jpg": "dog" for i in range(12)} | {f"c{i}.jpg": "cat" for i in range(9)}
    assert [(p.kind, p.severity) for p in training_blockers(nine)] == [("small_class", "warning")]


def test_balanced_labels_have_no_blockers() -> None:
    labels = {f"d{i}.jpg": "dog" for i in range(10)} | {f"c{i}.jpg": "cat" for i in range(10)}
    assert training_blockers(labels) == []
    assert kinds(training_blockers({})) == ["no_labels"]


@pytest.mark.parametrize(
    ("classes", "coded"),
    [
        ({"0", "1"}, True),
        ({"True", "FALSE"}, True),
        ({"yes", "no"}, True),
        ({"1", "2", "3"}, True),
        ({"person", "no_person"}, False),
        ({"0", "bag"}, False),
        (set(), False),
    ],
)
def test_labels_look_coded(classes: set[str], coded: bool) -> None:
    assert labels_look_coded(classes) is coded


def test_class_display_defaults_is_identity() -> None:
    assert class_display_defaults(["0", "1"]) == {"0": "0", "1": "1"}


# --------------------------------------------------------------------------- real sheets

needs_photos = pytest.mark.skipif(
    not (PHOTOS / "labels.csv").is_file(),
    reason=f"real product photos not found at {PHOTOS} (a fresh clone has no ../shared)",
)


@needs_photos
@pytest.mark.parametrize(
    ("sheet_name", "expected"),
    [("labels.csv", ("file", "label")), ("labels_parfois_style.csv", ("image_file_name", "label"))],
)
def test_real_sheets_read_and_guessed(sheet_name: str, expected: tuple[str, str]) -> None:
    sheet = read_sheet(PHOTOS / sheet_name, filename=sheet_name)
    assert len(sheet.frame) == 480
    assert guess_columns(sheet) == expected


@needs_photos
def test_real_sheets_give_identical_groupings() -> None:
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert len(names) == 480
    groupings = []
    for sheet_name in ("labels.csv", "labels_parfois_style.csv"):
        result = match(read_sheet(PHOTOS / sheet_name, filename=sheet_name), names)
        assert result.problems == []
        assert result.rows_matched == 480 and result.images_unlabelled == []
        by_class: dict[str, set[str]] = {}
        for image, label in result.labels.items():
            by_class.setdefault(label, set()).add(image)
        assert training_blockers(result.labels) == []
        groupings.append({frozenset(group) for group in by_class.values()})
    assert groupings[0] == groupings[1]
    assert sorted(map(len, groupings[0])) == [232, 248]


# ------------------------------------------------------------ odd sheets (issue 11, item 8)


def test_nan_na_and_dashes_are_not_classes():
    sheet = read_sheet(b"file,label\na.jpg,cat\nb.jpg,NaN\nc.jpg,N/A\nd.jpg,-\ne.jpg,\nf.jpg,#N/A\ng.jpg,dog\n",
                       filename="l.csv")
    names = [f"{c}.jpg" for c in "abcdefg"]
    result = match_labels(sheet, image_column="file", label_column="label", image_names=names)
    assert result.labels == {"a.jpg": "cat", "g.jpg": "dog"}  # before: 'NaN', 'N/A', '-' were classes
    empty = {p.row: p.message for p in result.problems if p.kind == "empty_label"}
    assert set(empty) == {3, 4, 5, 6, 7}
    assert "'N/A', which is not a label," in empty[4] and "has no label" in empty[6]


def _workbook_bytes(build) -> bytes:
    workbook = openpyxl.Workbook()
    build(workbook)
    buf = io.BytesIO()
    workbook.save(buf)
    return buf.getvalue()


def test_a_workbook_with_a_notes_sheet_first_is_read_from_the_sheet_naming_photos():
    def build(wb):
        notes = wb.active
        notes.title = "Notes"
        notes.append(["Labelled by the studio team in March"])
        notes.append(["Ask Anna about the blurry ones", "and the flat-lays"])
        labels_ws = wb.create_sheet("Labels")
        labels_ws.append(["photo", "label"])
        for i in range(4):
            labels_ws.append([f"p{i}.jpg", "person" if i % 2 else "no person"])

    sheet = read_sheet(_workbook_bytes(build), filename="labels.xlsx")
    assert list(sheet.frame.columns) == ["photo", "label"] and len(sheet.frame) == 4  # before: the Notes sheet
    assert "worksheet 'Labels'" in sheet.notes[0].message


def test_formula_cells_without_saved_values_are_reported_with_their_row():
    def build(wb):
        ws = wb.active
        ws.append(["photo", "label"])
        ws.append(["a.jpg", "person"])
        ws.append(["b.jpg", '=IF(1=1,"person","no person")'])  # openpyxl saves no result
        ws.append(["=CONCAT(\"c\",\".jpg\")", "no person"])

    sheet = read_sheet(_workbook_bytes(build), filename="formulas.xlsx")
    found = {p.row: p.message for p in sheet.notes if p.kind == "formula_without_value"}
    assert set(found) == {3, 4}  # before: silently empty cells
    assert "Cell B3 of 'formulas.xlsx' holds the formula =IF(" in found[3] and "save it" in found[3]
    result = match_labels(sheet, image_column="photo", label_column="label", image_names=["a.jpg", "b.jpg"])
    assert {p.kind for p in result.problems} >= {"formula_without_value", "empty_label", "empty_image_name"}


def test_a_huge_sheet_lists_the_first_rows_of_each_problem_and_counts_the_rest():
    rows = "".join(f"gone_{i}.jpg,cat\n" for i in range(5000))
    sheet = read_sheet(("file,label\nhere.jpg,cat\n" + rows).encode(), filename="big.csv")
    every = []
    result = match_labels(sheet, image_column="file", label_column="label", image_names=["here.jpg", "x.jpg"],
                          on_problem=every.append)
    missing = [p for p in result.problems if p.kind == "missing_photo"]
    assert len(missing) == 21 and len(every) == 5000  # before: 5,000 problems to store and draw
    assert [p.row for p in missing[:20]] == list(range(3, 23))
    assert "and 4,980 more rows of 'big.csv' like the 20 above (5,000 in all)" in missing[-1].message


@pytest.mark.parametrize("first_line", [b"MZ code,label", b"BM,label", b"RIFF,label", b"BZh,label", b"8BPS,label"])
def test_a_sheet_whose_first_cell_looks_like_a_signature_is_still_a_sheet(first_line: bytes) -> None:
    """Text that starts like a binary signature (a column named "MZ code") is read as the sheet it is."""
    sheet = read_sheet(first_line + b"\na.jpg,person\nb.jpg,bag\n", filename="labels.csv")
    assert len(sheet.frame) == 2


def test_a_catalog_export_is_told_what_a_catalog_needs() -> None:
    """The same reader serves label sheets and catalog exports; a catalog's messages speak of a catalog."""
    for data, words in ((b"8BPS\x00\x01" + bytes(200), "not a catalog export"), (b"", "Save your catalog export"),
                        (b";;;\r\n;;;\r\n", "a column of photo file names or links")):
        with pytest.raises(InputError, match=words) as caught:
            read_sheet(data, filename="export.csv", purpose="catalog")
        assert "label" not in str(caught.value)
