"""Pages against hostile input (AppTest): damaged photos and names written to look like links.

One project, built once: real photos (scikit-image), features from the offline
EfficientNet-Lite0, the quick model, class names that are markdown and HTML, a stored photo
damaged on disk after training, and a tagging run whose photo zip holds a JPEG cut short and
a JPEG header followed by junk. Every page must draw, with a placeholder where a photo
cannot be shown and user text shown as text.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app_pages.ui import plain
from core import tagging
from core.inputs import images
from core.learning import extraction, models, training
from tests.conftest import REPO, photo_project, sample_photo_set, shown

LINK_NAME = "[Sign in again](http://host/login) ![t](http://host/pixel.png)"
HTML_NAME = '<a href="http://host/x">No person</a>'
CATEGORY = "<a href='http://host/deal'>Cheap</a>"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("hostile-home")
    mp.setenv("CATALOG_LENS_HOME", str(root))
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def workspace_home(home, monkeypatch):
    monkeypatch.setenv("CATALOG_LENS_HOME", str(home))


@pytest.fixture(scope="module")
def built(home):
    from skimage import data

    folder = home / "photos"
    sheet = sample_photo_set(folder, {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea()]}, 8)
    # One astronaut labelled "no person": the model doubts it, so Explore lists it.
    sheet = sheet.replace("person_03.jpg,person", "person_03.jpg,no_person")
    project = photo_project("Hostile names", folder, sheet)
    project.set_class_names({"person": LINK_NAME, "no_person": HTML_NAME})
    extraction.extract_project(project, "efficientnet_lite0")
    training.train_frozen(project)

    good = (folder / "no_person_01.jpg").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.write(folder / "person_00.jpg", "person_00.jpg")
        z.writestr("cut.jpg", good[: len(good) // 3])  # a real JPEG cut short
        z.writestr("junk.jpg", b"\xff\xd8\xff\xe0" + os.urandom(600))  # a JPEG header, then junk
    catalog = f"sku,category,image\nA1,{CATEGORY},person_00.jpg\nA2,{CATEGORY},cut.jpg\nA3,Shoes,junk.jpg\n"
    model = models.tagging_model(project)
    run_id = tagging.start_project_run(
        project,
        catalog_name="catalog.csv",
        catalog_data=catalog.encode(),
        bundle_path=Path(model["path"]),
        zip_data=archive.getvalue(),
        options=tagging.TagOptions(image_columns=["image"]),
        threshold=model["threshold"],
    )
    folder_run = tagging.project_run_folder(project, run_id)
    assert tagging.run_tagging(folder_run).failed == 2

    # A stored photo damaged on disk after training (a disk error, a bad restore).
    damaged = project.names().set_index("name").loc["person_03.jpg", "sha"]
    ext = project.images().set_index("sha").loc[damaged, "ext"]
    project.image_path(damaged, ext).write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    for cached in project.root.glob(f"thumbs/*/{damaged}-*.jpg"):
        cached.unlink()
    return {"project": project, "run": folder_run, "damaged": damaged}


def _page(project, step: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.query_params["project"] = project.slug
    at.run()
    at.switch_page(f"app_pages/steps/{step}.py").run()
    assert not at.exception, at.exception
    return at


def _texts(at: AppTest) -> list[str]:
    """Every markdown source on the page: text elements, alerts, image captions."""
    out = []
    for kind in ("markdown", "caption", "info", "success", "warning", "error", "title", "header", "subheader"):
        out += [e.value for e in at.get(kind)]
    for element in at.get("image"):
        out += [img.caption for img in element.proto.imgs]
    return out


def _live(markdown: str) -> list[str]:
    """Link, image or autolink syntax that a markdown renderer would bring alive (escaped signs removed)."""
    bare = re.sub(r"\\.", "", markdown)
    return re.findall(r"\]\(|https?://|www\.|<a\b|<img\b", bare)


def _chart_specs(at: AppTest) -> str:
    """Every Plotly figure of the page as plain JSON text (the wire format escapes <, > and &)."""
    return " ".join(json.dumps(json.loads(chart.proto.spec), ensure_ascii=False) for chart in at.get("plotly_chart"))


def _image_count(at: AppTest) -> int:
    return sum(len(element.proto.imgs) for element in at.get("image"))


def test_tag_page_shows_every_review_row_with_a_placeholder_for_a_corrupt_photo_and_the_downloads(built):
    at = _page(built["project"], "tag")
    rows = [m.value for m in at.markdown if m.value.startswith("Row ")]
    assert any("cut" in r and "truncated" in r for r in rows) and any("junk" in r for r in rows)
    assert _image_count(at) >= len(rows)  # every review row has its picture: the photo or the placeholder
    thumbs = tagging.review_thumbnails(
        built["run"], [{"row": 1, "photos": ["cut.jpg"]}, {"row": 2, "photos": ["junk.jpg"]}]
    )
    assert thumbs == {1: images.placeholder(size=220), 2: images.placeholder(size=220)}
    labels = {b.label for b in at.get("download_button")}
    assert {"Download as CSV", "Download as Excel", "Download as Parquet"} <= labels
    at.selectbox(key=f"split-{built['run'].name}").select("category").run()  # a chart of the catalog's values
    specs = _chart_specs(at)
    assert "<a href" not in specs and "&lt;a href='http://host/deal'&gt;Cheap" in specs  # drawn as text


def test_a_damaged_stored_photo_is_a_placeholder_on_every_page(built):
    project = built["project"]
    assert project.thumbnail(built["damaged"]) == images.placeholder(size=256)
    for step in ("data", "explore", "train", "report"):
        at = _page(project, step)
        assert _image_count(at) > 0, step
    explore = _page(project, "explore")
    assert any(plain("person_03.jpg") in m.value for m in explore.markdown)  # listed, with its placeholder


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("cut.jpg", b"\xff\xd8\xff\xe0" + b"junk" * 200),
        ("notes.jpg", b"hello, this is not a photo\n"),
        ("drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg"><text>hi</text></svg>'),
        ("empty.jpg", b""),
    ],
)
def test_try_a_photo_with_a_file_that_is_not_a_photo_says_so(built, name, data):
    at = _page(built["project"], "train")
    at.file_uploader(key="try_photo").set_value([(name, data, "image/jpeg")]).run()
    assert not at.exception, at.exception
    assert any(plain(name) in e.value for e in at.error)
    assert _image_count(at) > 0  # the placeholder stands in for the photo


def test_try_a_photo_with_a_decompression_bomb_says_it_is_too_large(built):
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    at = _page(built["project"], "train")
    at.file_uploader(key="try_photo").set_value([("bomb.png", bomb, "image/png")]).run()
    assert not at.exception, at.exception
    assert any(plain("bomb.png") in e.value and "too large" in e.value for e in at.error)


def test_report_page_shows_class_names_as_text_never_as_links(built):
    at = _page(built["project"], "report")
    texts = _texts(at)
    quoting = [t for t in texts if "Sign in again" in t or "No person" in t or "Cheap" in t]
    assert quoting, "the class names appear on the page"
    assert [t for t in quoting if _live(t)] == []
    specs = _chart_specs(at)
    assert "<a href" not in specs and "&lt;a href" in specs  # Plotly draws the HTML name as text


@pytest.mark.parametrize("step", ["data", "explore", "tag", "train"])
def test_other_pages_draw_the_names_as_text(built, step):
    at = _page(built["project"], step)
    assert [t for t in _texts(at) if ("Sign in again" in t or "No person" in t) and _live(t)] == []
    assert "<a href" not in _chart_specs(at)


def test_a_refused_upload_names_its_file_once():
    """The sheet reader's sentences name the file already; other refusals get the name put first."""

    def page():
        from app_pages import ui
        from core.base.problems import InputError
        from core.inputs import sheets

        try:
            sheets.read_sheet(b"8BPS\x00\x01" + bytes(100), filename="labels [final].csv")
        except InputError as exc:
            ui.file_error("labels [final].csv", exc)
        ui.file_error("resnet50 (copy).pth", ValueError("this is not a weights file"))

    at = AppTest.from_function(page).run()
    sheet, weights = (shown(e.value) for e in at.error)
    assert sheet.count("labels [final].csv") == 1 and "is a Photoshop file (PSD), not a label sheet" in sheet
    assert weights == "resnet50 (copy).pth: this is not a weights file"
