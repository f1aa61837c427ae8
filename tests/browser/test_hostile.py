"""Hostile input in a real Chromium: a catalog zip with corrupt photos, class names that look like links."""

from __future__ import annotations

import csv
import io
import os
import zipfile

import openpyxl
import pandas as pd
import pytest

from tests.browser.conftest import shot
from tests.conftest import photo_project, sample_photo_set

pytestmark = pytest.mark.browser
UPLOAD = '[data-testid="stFileUploader"] input[type=file]'
LINK_NAME = "[Sign in again](http://host.invalid/login) ![t](http://host.invalid/pixel.png)"


@pytest.fixture(scope="module")
def project(server, tmp_path_factory):
    """A trained project made in the server's workspace (features and the quick model), as the journey leaves it."""
    from skimage import data

    from core.learning import extraction, training

    mp = pytest.MonkeyPatch()
    mp.setenv("CATALOG_LENS_HOME", str(server["home"]))
    folder = tmp_path_factory.mktemp("hostile") / "photos"
    sheet = sample_photo_set(folder, {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea()]}, 8)
    created = photo_project("Hostile", folder, sheet)
    created.set_class_names({"person": LINK_NAME, "no_person": "<a href='http://host.invalid/x'>No person</a>"})
    extraction.extract_project(created, "efficientnet_lite0")
    training.train_frozen(created)
    mp.undo()
    return {"slug": created.slug, "photos": folder}


def test_tag_page_with_corrupt_photos_shows_its_review_list_and_downloads(server, page, project, tmp_path):
    good = (project["photos"] / "no_person_01.jpg").read_bytes()
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(project["photos"] / "person_00.jpg", "person_00.jpg")
        z.writestr("cut.jpg", good[: len(good) // 3])  # a real JPEG cut short
        z.writestr("junk.jpg", b"\xff\xd8\xff\xe0" + os.urandom(600))  # a JPEG header, then junk
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,note,image\nA1,=1+1,person_00.jpg\nA2,ok,cut.jpg\nA3,@SUM(A1),junk.jpg\n")
    page.goto(f"{server['url']}/tag?project={project['slug']}")
    page.get_by_role("heading", name="5 · Tag catalog").wait_for()
    # One file at a time, as a person uploads them: each upload reruns the page, and on a slow machine
    # (CI) the catalog's preview, column picker and button can take a while to be drawn.
    page.locator(UPLOAD).nth(0).set_input_files(str(catalog))
    page.get_by_text("Columns with the photos").wait_for(timeout=120_000)
    page.locator(UPLOAD).nth(1).set_input_files(str(archive))
    page.get_by_text("photos.zip").wait_for(timeout=120_000)
    page.get_by_role("button", name="Start tagging").click(timeout=120_000)
    page.get_by_text("3 of 3 rows done").wait_for(timeout=240_000)
    page.get_by_text("Row 3:").wait_for()
    page.get_by_text("Row 4:").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    pictures = page.locator('[data-testid="stImage"] img')
    # Streamlit loads its image component's code on first use: the rows' text can be drawn a moment
    # before their pictures, so wait for the pictures (a timeout fails the test) before looking at them.
    pictures.nth(1).wait_for(timeout=30_000)  # the review rows' pictures: placeholders where the photo is broken
    page.wait_for_function("[...document.images].every(i => i.complete)")
    assert page.evaluate("[...document.images].filter(i => i.naturalWidth === 0).length") == 0
    for width in (1024, 1400):
        page.set_viewport_size({"width": width, "height": 1000})
        shot(page, f"tag-corrupt-photos-{width}")

    files = {}
    for label, suffix in (
        ("Download as CSV", "csv"),
        ("Download as Excel", "xlsx"),
        ("Download as Parquet", "parquet"),
    ):
        with page.expect_download() as download:
            page.get_by_role("button", name=label).click()
        files[suffix] = tmp_path / f"tagged.{suffix}"
        download.value.save_as(files[suffix])
    rows = list(csv.reader(io.StringIO(files["csv"].read_text(encoding="utf-8-sig"), newline="")))
    assert len(rows) == 4 and rows[1][1] == "'=1+1" and rows[3][1] == "'@SUM(A1)"
    sheet = openpyxl.load_workbook(files["xlsx"]).active
    assert sheet["B2"].value == "=1+1" and sheet["B2"].data_type == "s"
    assert pd.read_parquet(files["parquet"])["note"].tolist() == ["=1+1", "ok", "@SUM(A1)"]

    # A next catalog that is not one (a Photoshop file under a .csv name): the page says what it
    # is and what a catalog export needs, and the last run's rows stay on the page below.
    page.get_by_text("New tagging run").click()
    psd = tmp_path / "next-catalog.csv"
    psd.write_bytes(b"8BPS\x00\x01" + bytes(300))
    page.locator(UPLOAD).nth(0).set_input_files(str(psd))
    page.get_by_text("'next-catalog.csv' is a Photoshop file (PSD), not a catalog export").wait_for(timeout=120_000)
    assert page.get_by_text("3 of 3 rows done").is_visible()
    assert page.get_by_role("button", name="Download as CSV").count() == 1


def test_report_page_draws_link_like_class_names_as_text(server, page, project):
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{server['url']}/report?project={project['slug']}")
    page.get_by_role("heading", name="What was not checked").wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.get_by_text("[Sign in again]").count() >= 1  # shown as the very text typed
    assert page.locator('a[href*="host.invalid"], img[src*="host.invalid"]').count() == 0
    assert [u for u in requests if "host.invalid" in u] == []
    shot(page, "report-link-like-names")
