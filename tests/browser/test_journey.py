"""The main journey in a real Chromium against a running server."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.browser.conftest import shot
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.browser
UPLOAD = '[data-testid="stFileUploader"] input[type=file]'


def _photo_set(tmp: Path) -> tuple[list[Path], Path]:
    """Real labelled photos: the shared product photos when present, else scikit-image's."""
    shared = SHARED_DATA / "product-photos"
    folder = tmp / "photos"
    folder.mkdir()
    if (shared / "labels.csv").is_file():
        lines = (shared / "labels_parfois_style.csv").read_text().splitlines()
        header, rows = lines[0], lines[1:]
        person = [r for r in rows if r.split(";")[1] == "1"][:20]
        other = [r for r in rows if r.split(";")[1] == "0"][:20]
        chosen = person + other
        for r in chosen:
            shutil.copy(shared / r.split(";")[0], folder)
        sheet = tmp / "labels.csv"
        sheet.write_text("\n".join([header, *chosen]) + "\n")
    else:
        from skimage import data

        sheet_rows = ["image_file_name;label"]
        for i, (name, label) in enumerate([("astronaut", 1), ("coffee", 0), ("chelsea", 0), ("rocket", 0)] * 5):
            arr = getattr(data, name)()
            img = Image.fromarray(arr).convert("RGB").rotate(i * 7)
            img.save(folder / f"{name}{i}.jpg", quality=90)
            sheet_rows.append(f"{name}{i}.jpg;{label}")
        sheet = tmp / "labels.csv"
        sheet.write_text("\n".join(sheet_rows) + "\n")
    return sorted(folder.iterdir()), sheet


def test_a_deep_link_on_a_fresh_server_opens_inside_the_app(server, page):
    """A refresh on a step after a server restart must still show the whole app."""
    page.goto(f"{server['url']}/backbone")
    page.get_by_role("heading", name="2 · Backbone").wait_for()
    page.wait_for_timeout(500)
    assert page.get_by_text("Page not found").count() == 0
    nav = page.locator('[data-testid="stSidebarNav"]')
    nav.get_by_text("1 · Data").wait_for()
    assert "ui" not in nav.inner_text().split()  # not the legacy one-page-per-file menu
    page.get_by_text("Computing on").wait_for()


def test_create_project_upload_photos_and_sheet_then_refresh(server, page, tmp_path):
    photos, sheet = _photo_set(tmp_path)
    page.goto(server["url"])
    page.get_by_text("Start by creating a project").wait_for()
    page.get_by_text("Computing on").wait_for()  # the first run has finished
    page.get_by_label("Name").fill("Person in photo")
    page.get_by_role("button", name="Create project").click()
    page.get_by_text("Project: Person in photo").wait_for()
    shot(page, "home")

    page.get_by_role("link", name="1 · Data").click()
    page.get_by_role("heading", name="1 · Data").wait_for()
    archive = tmp_path / "photos.zip"  # a zip of a folder, as an analyst would send it
    with zipfile.ZipFile(archive, "w") as zf:
        for p in photos:
            zf.write(p, f"catalog photos/{p.name}")
    page.locator(UPLOAD).nth(0).set_input_files(str(archive))
    page.get_by_text(f"Checked {len(photos)} files").wait_for(timeout=120_000)
    page.locator(UPLOAD).nth(1).set_input_files(str(sheet))
    page.get_by_text("Name the classes").wait_for()
    labelled = page.locator('[data-testid="stMetric"]').filter(has_text="Labelled")
    assert labelled.inner_text().split()[-1] == str(len(photos))
    shot(page, "data")

    page.reload()  # nothing is lost on a refresh
    page.get_by_role("heading", name="1 · Data").wait_for()
    labelled = page.locator('[data-testid="stMetric"]').filter(has_text="Labelled")
    labelled.wait_for()
    assert labelled.inner_text().split()[-1] == str(len(photos))
    assert "1 · Data  ✓" in page.locator('[data-testid="stSidebarNav"]').inner_text() or \
        "✓" in page.locator('[data-testid="stSidebarNav"]').inner_text()


def test_extract_train_and_explore_in_the_browser(server, page):
    """Continues the project of the previous test: features, the quick model, the map."""
    page.goto(f"{server['url']}/backbone?project=person-in-photo")
    page.get_by_role("heading", name="2 · Backbone").wait_for()
    page.get_by_role("button", name="Extract features").click()
    page.get_by_text("Features are ready for all").wait_for(timeout=240_000)
    shot(page, "backbone")
    page.reload()  # a second visit costs nothing: the cache answers at once
    page.get_by_text("Features are ready for all").wait_for()
    assert page.get_by_role("button", name="Extract features").count() == 0

    page.get_by_role("link", name="Next: 3 · Train & compare").click()
    page.get_by_role("button", name="Train the quick model").click()
    page.get_by_text("Balanced accuracy on held-out photos").wait_for(timeout=240_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    shot(page, "train")

    page.get_by_role("link", name="Next: 4 · Explore").click()
    page.get_by_text("Likely label mistakes").wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for()
    shot(page, "explore")


def test_tag_a_catalog_in_the_browser(server, page, tmp_path):
    """Continues the project: a catalog naming its photos is tagged and offered for download."""
    names = [f"catalog photos/{p.name}" for p in _photo_set(tmp_path)[0]]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku;title;image\n" + "".join(f"S{i};Item {i};{n.split('/')[-1]}\n" for i, n in enumerate(names)))
    page.goto(f"{server['url']}/tag?project=person-in-photo")
    page.get_by_role("heading", name="5 · Tag catalog").wait_for()
    page.locator(UPLOAD).nth(0).set_input_files(str(catalog))
    page.get_by_role("button", name="Start tagging").click()
    page.get_by_text(f"{len(names)} of {len(names)} rows done").wait_for(timeout=240_000)
    page.get_by_role("button", name="Download as CSV").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    shot(page, "tag")
