"""core.inputs.encodings: sheets saved in a Windows or East Asian character set are read right,
chosen by the uploaded photo names they match, and the choice is said."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from core import tasks  # noqa: F401  (the intake job's handler)
from core.base.problems import InputError
from core.inputs import labels
from core.inputs.sheets import read_sheet
from core.projects import intake, jobs, workspace

POLISH = ["łódź_żółw.jpg", "żaba_świeża.jpg", "gęś_ćma.jpg", "źrebię.jpg"]
POLISH_SHEET = ("plik;etykieta\n" + "".join(f"{n};{'zwierzę' if i % 2 else 'płaz'}\n" for i, n in enumerate(POLISH)))
JAPANESE_SHEET = "ファイル,ラベル\n猫の写真.jpg,猫\n犬の写真.jpg,犬\n鳥の写真.jpg,鳥\n"


def test_a_polish_cp1250_sheet_is_read_by_the_photo_names_it_matches():
    data = POLISH_SHEET.encode("cp1250")
    sheet = read_sheet(data, filename="etykiety.csv", photo_names=POLISH)
    assert sheet.encoding == "cp1250"
    assert sheet.frame["plik"].tolist() == POLISH  # before: '³ódŸ_¿ó³w.jpg' (read as cp1252)
    result = labels.match_labels(sheet, image_column="plik", label_column="etykieta", image_names=POLISH)
    assert result.rows_matched == 4 and set(result.labels.values()) == {"zwierzę", "płaz"}
    note = next(p for p in result.problems if p.kind == "sheet_encoding")
    assert "Central European (Windows-1250)" in note.message and "found the most uploaded photo names (4)" in note.message


def test_a_western_sheet_without_photos_to_compare_stays_windows_1252():
    data = "Référence;Désignation;Photo\nR001;Été;ÉTÉ.JPG\n".encode("cp1252")
    sheet = read_sheet(data, filename="catalogue.csv")
    assert sheet.encoding == "cp1252" and sheet.frame["Photo"].tolist() == ["ÉTÉ.JPG"]
    assert "Western European (Windows-1252)" in sheet.notes[0].message


def test_a_japanese_shift_jis_sheet_is_read_not_refused():
    data = JAPANESE_SHEET.encode("shift_jis")
    sheet = read_sheet(data, filename="ラベル.csv")  # before: "not readable text"
    assert sheet.encoding in ("cp932", "shift_jis")
    assert sheet.frame["ファイル"].tolist() == ["猫の写真.jpg", "犬の写真.jpg", "鳥の写真.jpg"]
    assert "Japanese (Shift-JIS)" in sheet.notes[0].message


def test_utf8_needs_no_note_and_binary_is_still_refused():
    assert read_sheet(POLISH_SHEET.encode("utf-8"), filename="a.csv").notes == []
    with pytest.raises(InputError, match="not readable text"):
        read_sheet(bytes(range(256)) * 40, filename="b.csv")


def _zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(names):
            img = io.BytesIO()
            Image.fromarray(np.full((24, 32, 3), i * 50, np.uint8)).save(img, "JPEG")
            zf.writestr(zipfile.ZipInfo(name), img.getvalue())  # UTF-8 names (flag set by zipfile)
    return buf.getvalue()


def test_the_data_page_labels_the_polish_photos_and_says_which_character_set(workspace_home):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    project = workspace.create_project("Zwierzęta")
    intake.stage_upload(project, filename="zdjecia.zip", data=_zip(POLISH))
    job = jobs.submit(project, "intake", start=False)
    assert jobs.run(project, job.id).status == "done"
    intake.apply_sheet(project, filename="etykiety.csv", data=POLISH_SHEET.encode("cp1250"))
    assert intake.data_summary(project)["labelled"] == 4  # before: 0, nothing matched
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.query_params["project"] = project.slug
    at.run().switch_page("app_pages/steps/data.py").run()
    assert not at.exception
    shown = " ".join(str(df.value["message"].tolist()) for df in at.dataframe if "message" in df.value)
    assert "Central European (Windows-1250)" in shown
