"""The main journey in a real Chromium against a running server."""

from __future__ import annotations

import re
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


def press(page, name: str):
    """Click a button only if it is the page's recommended (primary) one: the journey needs no other."""
    button = page.get_by_role("button", name=name)
    button.wait_for()
    kind = button.evaluate("b => b.closest('[data-testid^=stBaseButton]')?.dataset.testid || b.dataset.testid")
    assert kind == "stBaseButton-primary", f"{name!r} is not a recommended button ({kind})"
    button.click()


def next_step(page, title: str) -> None:
    page.get_by_role("link", name=f"Next: {title}").click()
    page.get_by_role("heading", name=title).wait_for()


def test_create_project_upload_photos_and_sheet_then_refresh(server, page, tmp_path):
    photos, sheet = _photo_set(tmp_path)
    page.goto(server["url"])
    page.get_by_text("Start by creating a project").wait_for()
    page.get_by_text("Computing on").wait_for()  # the first run has finished
    page.get_by_label("Name").fill("Person in photo")
    press(page, "Create project")
    page.get_by_text("Project: Person in photo").wait_for()
    shot(page, "home")

    page.get_by_role("link", name="Go").click()  # the home page points at the next step
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
    page.goto(f"{server['url']}/data?project=person-in-photo")
    page.get_by_role("heading", name="1 · Data").wait_for()
    next_step(page, "2 · Backbone")
    press(page, "Extract features")
    page.get_by_text("Features are ready for all").wait_for(timeout=240_000)
    shot(page, "backbone")
    page.reload()  # a second visit costs nothing: the cache answers at once
    page.get_by_text("Features are ready for all").wait_for()
    assert page.get_by_role("button", name="Extract features").count() == 0

    next_step(page, "3 · Train & compare")
    press(page, "Train the quick model")
    page.get_by_text("Balanced accuracy on held-out photos").wait_for(timeout=240_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    shot(page, "train")

    next_step(page, "4 · Explore")
    page.get_by_text("Likely label mistakes").wait_for(timeout=120_000)
    page.locator(".js-plotly-plot").first.wait_for()
    shot(page, "explore")


def test_tag_a_catalog_and_export_the_report_in_the_browser(server, page, tmp_path):
    """Continues the project: tag a catalog, download it, then download the report and read it offline."""
    names = [p.name for p in _photo_set(tmp_path)[0]]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku;category;image\n" + "".join(
        f"S{i};{'Tops' if i % 2 else 'Shoes'};{n}\n" for i, n in enumerate(names)))
    page.goto(f"{server['url']}/explore?project=person-in-photo")
    page.get_by_role("heading", name="4 · Explore").wait_for()
    next_step(page, "5 · Tag catalog")
    page.locator(UPLOAD).nth(0).set_input_files(str(catalog))
    press(page, "Start tagging")
    page.get_by_text(f"{len(names)} of {len(names)} rows done").wait_for(timeout=240_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    shot(page, "tag")
    with page.expect_download() as download:
        press(page, "Download as CSV")
    tagged = tmp_path / "tagged.csv"
    download.value.save_as(tagged)
    lines = tagged.read_text(encoding="utf-8-sig").splitlines()
    assert len(lines) == len(names) + 1 and "predicted_label" in lines[0] and "needs_review" in lines[0]

    next_step(page, "6 · Report")
    page.get_by_role("heading", name="What was not checked").wait_for(timeout=120_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    page.get_by_text(f"{len(names)} rows").first.wait_for()
    assert page.get_by_text("Your classes are still called").count() == 1  # the sheet said 1 / 0
    shot(page, "report")
    with page.expect_download() as download:
        press(page, "Download the report (HTML)")
    exported = tmp_path / "report.html"
    download.value.save_as(exported)

    offline = page.context.browser.new_context(offline=True)  # a manager's laptop on a plane
    requests = []
    reader = offline.new_page()
    reader.on("request", lambda r: requests.append(r.url))
    reader.goto(exported.as_uri())
    reader.get_by_role("heading", name="How well it works").wait_for()
    assert reader.get_by_text("Does the photo show").count() >= 1
    broken = reader.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
    assert broken == 0 and reader.evaluate("document.images.length") > 8
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    shot(reader, "report-file")
    reader.emulate_media(media="print")  # Ctrl+P ▸ Save as PDF, as a manager would
    pdf = reader.pdf(prefer_css_page_size=True, print_background=True)
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
    assert 1 <= pages <= 4, f"the report prints on {pages} A4 pages"
    offline.close()
    page.reload()
    page.get_by_role("heading", name="6 · Report").wait_for()
    assert re.search(r"6 · Report\s*✓", page.locator('[data-testid="stSidebarNav"]').inner_text())


# ------------------------------------------------------- a second project, three classes

GARMENTS = {"1": ("pants", "Trousers"), "2": ("t-shirt", "T-shirt"), "3": ("shoes", "Shoes")}


def _three_class_set(tmp: Path) -> tuple[Path, Path]:
    """Photos of three classes with a label sheet of codes 1/2/3: the shared flat-lay garments
    when present, else crops of scikit-image's sample photos."""
    folder = tmp / "garments"
    folder.mkdir()
    rows = ["photo;code"]
    flat = SHARED_DATA / "flat-lay"
    if (flat / "labels.csv").is_file():
        lines = (flat / "labels.csv").read_text().splitlines()[1:]
        for code, (garment, _) in GARMENTS.items():
            for line in [x for x in lines if x.split(",")[2] == garment][:12]:
                shutil.copy(flat / line.split(",")[0], folder)
                rows.append(f"{line.split(',')[0]};{code}")
    else:
        from skimage import data

        for code, array in (("1", data.astronaut()), ("2", data.coffee()), ("3", data.chelsea())):
            for i in range(10):
                img = Image.fromarray(array).convert("RGB").rotate(i * 5)
                img.crop((i * 6, i * 4, img.width - i * 5, img.height - i * 3)).save(folder / f"c{code}_{i}.jpg")
                rows.append(f"c{code}_{i}.jpg;{code}")
    sheet = tmp / "garment-codes.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return folder, sheet


def _boxes_overlap(page, chart) -> list[str]:
    """Legend entries of a chart that its toolbar (the Plotly modebar) covers."""
    return chart.evaluate("""el => {
        const bar = el.querySelector('.modebar'); if (!bar) return [];
        const b = bar.getBoundingClientRect();
        return [...el.querySelectorAll('.legend .traces')].filter(t => {
            const r = t.getBoundingClientRect();
            return r.left < b.right && b.left < r.right && r.top < b.bottom && b.top < r.bottom;
        }).map(t => t.textContent);
    }""")


def _check_toolbar_and_legend(page, chart, name: str) -> None:
    for width in (1024, 1400):
        page.set_viewport_size({"width": width, "height": 1000})
        page.wait_for_timeout(800)
        chart.hover()  # the toolbar shows on hover
        page.wait_for_timeout(300)
        assert chart.locator(".legend .traces").count() >= 2
        assert _boxes_overlap(page, chart) == [], f"the toolbar covers legend entries of the {name} at {width} px"
        shot(page, f"{name}-{width}")
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_a_second_three_class_project_trains_tags_and_downloads_class_names(server, page, tmp_path, monkeypatch):
    from core.projects import workspace

    folder, sheet = _three_class_set(tmp_path)
    photos = sorted(folder.iterdir())
    monkeypatch.setenv(workspace.HOME_ENV, str(server["home"]))  # the server's workspace
    first = workspace.list_projects()[0] if workspace.list_projects() else workspace.create_project("First one")
    page.goto(f"{server['url']}/?project={first.slug}")
    page.get_by_text(f"Project: {first.name}").wait_for()
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_text("New project").click()
    sidebar.get_by_label("Name", exact=True).fill("Garments")
    press(page, "Create project")
    page.get_by_text("Project: Garments").wait_for()
    page.wait_for_timeout(1000)
    picker = sidebar.locator('[data-testid="stSelectbox"] input').first
    assert picker.input_value() == "Garments"  # the picker follows the new project (before: the old one)
    assert sidebar.get_by_label("Name", exact=True).input_value() == ""  # ready for the next one

    page.get_by_role("link", name="Go").click()
    page.get_by_role("heading", name="1 · Data").wait_for()
    archive = tmp_path / "garments.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in photos:
            zf.write(p, p.name)
    page.locator(UPLOAD).nth(0).set_input_files(str(archive))
    page.get_by_text(f"Checked {len(photos)} files").wait_for(timeout=120_000)
    page.locator(UPLOAD).nth(1).set_input_files(str(sheet))
    page.get_by_text("Name the classes").wait_for()
    for code, (_, name) in GARMENTS.items():
        page.get_by_label(f"Label “{code}”").fill(name)
    page.get_by_role("button", name="Save names").click()
    page.get_by_text("Trousers:").first.wait_for()  # photos per class, by name

    next_step(page, "2 · Backbone")
    press(page, "Extract features")
    page.get_by_text("Features are ready for all").wait_for(timeout=300_000)
    next_step(page, "3 · Train & compare")
    press(page, "Train the quick model")
    page.get_by_text("Balanced accuracy on held-out photos").wait_for(timeout=240_000)
    assert page.locator('[data-testid="stException"]').count() == 0

    next_step(page, "4 · Explore")
    chart = page.locator(".js-plotly-plot").first
    chart.wait_for(timeout=120_000)
    page.get_by_text("Click a point to see its photo").wait_for()
    _check_toolbar_and_legend(page, chart, "explore-map")
    point = chart.evaluate("""el => {
        const L = el._fullLayout, t = el._fullData[0], box = el.querySelector('.nsewdrag').getBoundingClientRect();
        return [box.left + L.xaxis.l2p(t.x[0]), box.top + L.yaxis.l2p(t.y[0])];
    }""")
    page.mouse.click(*point)  # one click on one photo's point...
    page.get_by_text("1 selected photo", exact=True).wait_for(timeout=60_000)  # ...shows that photo
    page.locator('[data-testid="stImage"] img').first.wait_for(timeout=60_000)  # its thumbnail (drawn just after)
    shot(page, "explore-clicked")

    names = [p.name for p in photos]
    catalog = tmp_path / "garment-catalog.csv"
    catalog.write_text("sku;category;image\n" + "".join(
        f"G{i};{'Summer' if i % 2 else 'Winter'};{n}\n" for i, n in enumerate(names)))
    next_step(page, "5 · Tag catalog")
    page.locator(UPLOAD).nth(0).set_input_files(str(catalog))
    press(page, "Start tagging")
    page.get_by_text(f"{len(names)} of {len(names)} rows done").wait_for(timeout=240_000)
    assert page.locator('[data-testid="stException"]').count() == 0
    split_chart = page.locator(".js-plotly-plot").nth(1)
    split_chart.wait_for()
    _check_toolbar_and_legend(page, split_chart, "tag-split")
    page.get_by_text("Your class names").wait_for()  # the default choice for the download
    with page.expect_download() as download:
        press(page, "Download as CSV")
    tagged = tmp_path / "garments-tagged.csv"
    download.value.save_as(tagged)
    rows = [line.split(";") for line in tagged.read_text(encoding="utf-8-sig").splitlines()]
    header, body = rows[0], rows[1:]
    label, code = header.index("predicted_label"), header.index("predicted_code")
    assert len(body) == len(names)
    assert {r[label] for r in body} <= {"Trousers", "T-shirt", "Shoes"} and len({r[label] for r in body}) == 3
    truth = {line.split(";")[0]: line.split(";")[1] for line in sheet.read_text().splitlines()[1:]}
    right = sum(r[code] == truth[r[header.index("image")]] for r in body)
    assert right >= 0.8 * len(body), f"{right} of {len(body)} right"
    assert all(GARMENTS[r[code]][1] == r[label] for r in body)  # the name and its code agree
