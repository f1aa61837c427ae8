"""Every page through Streamlit's AppTest: renders, reacts to input, keeps state on disk."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core.projects import jobs, workspace
from tests.conftest import REPO

TIMEOUT = 60


def _app(project: str | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    if project:
        at.query_params["project"] = project
    return at


def _jpeg(colour, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def project():
    return workspace.create_project("Person in photo")


@pytest.mark.parametrize("page", ["home", "data", "backbone", "train", "explore", "tag", "report"])
def test_every_page_renders_without_a_project(page):
    at = _app().run()
    if page != "home":
        at.switch_page(f"app_pages/steps/{page}.py").run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown) + " ".join(i.value for i in at.info)
    assert "project" in text.lower()


@pytest.mark.parametrize("page", ["home", "data", "backbone", "train", "explore", "tag", "report"])
def test_every_page_renders_with_an_empty_project(project, page):
    at = _app(project.slug).run()
    if page != "home":
        at.switch_page(f"app_pages/steps/{page}.py").run()
    assert not at.exception, at.exception


def test_create_project_from_the_sidebar_and_it_survives_a_new_session():
    at = _app().run()
    at.sidebar.text_input(key="new_project_name").input("Summer shoes").run()
    at.sidebar.button(key="create_project").click().run()
    assert not at.exception
    assert [p.name for p in workspace.list_projects()] == ["Summer shoes"]
    assert at.query_params["project"] in ("summer-shoes", ["summer-shoes"])
    fresh = _app().run()  # a new tab / refresh: the last project opens again
    assert any("Summer shoes" in s.value for s in fresh.subheader)


def test_a_project_created_from_a_page_is_the_one_the_picker_shows(project):
    """The browser journey checks what Chromium shows; here, that the picker's value follows."""
    at = _app(project.slug).run()
    at.switch_page("app_pages/steps/data.py").run()
    at.sidebar.text_input(key="new_project_name").input("Summer shoes").run()
    at.sidebar.button(key="create_project").click().run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="project_picker").value == "summer-shoes"
    at.sidebar.checkbox(key="sure-summer-shoes").check().run()
    at.sidebar.button(key="delete").click().run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="project_picker").value is None


def test_an_empty_name_gets_a_plain_message():
    at = _app().run()
    at.sidebar.button(key="create_project").click().run()
    assert "Give the project a name" in at.sidebar.error[0].value
    assert workspace.list_projects() == []


def test_rename_project(project):
    at = _app(project.slug).run()
    at.sidebar.text_input(key=f"rename-{project.slug}").input("Models on photos").run()
    at.sidebar.button(key="rename").click().run()
    assert workspace.open_project(project.slug).name == "Models on photos"


def test_delete_needs_confirmation(project):
    at = _app(project.slug).run()
    assert at.sidebar.button(key="delete").disabled
    at.sidebar.checkbox(key=f"sure-{project.slug}").check().run()
    at.sidebar.button(key="delete").click().run()
    assert not at.exception
    assert workspace.list_projects() == []


def test_sidebar_lists_projects_and_shows_the_device(project):
    other = workspace.create_project("Flat lay")
    at = _app(project.slug).run()
    picker = at.sidebar.selectbox[0]
    assert set(picker.options) == {"Person in photo", "Flat lay"} and picker.value == project.slug
    assert any(e.label == "Manage project" for e in at.sidebar.expander)
    assert any("Computing on" in c.value and "CPU" in c.value for c in at.sidebar.caption)
    assert other.slug != project.slug


def test_last_project_reopens_in_a_new_session():
    workspace.create_project("Summer shoes")
    workspace.remember_last_project("summer-shoes")
    at = _app().run()
    assert any("Summer shoes" in s.value for s in at.subheader)


def test_data_page_upload_photos_and_sheet(project):
    at = _app(project.slug).run()
    at.switch_page("app_pages/steps/data.py").run()
    photos = [(f"p{i}.jpg", _jpeg((200, 30 * i, 40)), "image/jpeg") for i in range(6)]
    photos += [(f"n{i}.jpg", _jpeg((20, 30 * i, 200)), "image/jpeg") for i in range(6)]
    photos.append(("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", "image/jpeg"))
    at.file_uploader[0].set_value(photos).run()
    assert not at.exception
    job = jobs.latest(project, "intake")
    assert job is not None
    job = jobs.wait(project, job.id, timeout=120)
    assert job.status == "done", job.error
    sheet = "file;label;;\n" + "".join(f"p{i}.jpg;1;;\n" for i in range(6)) + "".join(
        f"n{i}.JPG;0;;\n" for i in range(6)) + "ghost.jpg;1;;\n"
    at.run()
    at.file_uploader[1].set_value([("labels.csv", sheet.encode("cp1252"), "text/csv")]).run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Photos"] == "12" and metrics["Labelled"] == "12"
    assert int(metrics["Problems"]) >= 1  # the broken file
    problems = project.problems()
    assert "broken.jpg" in " ".join(problems["file"].fillna(""))
    assert any("ghost.jpg" in m for m in problems["message"])
    # Coded labels: the page offers to name the classes.
    names_box = [t for t in at.text_input if t.label.startswith("Label “")]
    assert {t.label for t in names_box} == {"Label “0”", "Label “1”"}
    names_box[1].input("Person in photo")
    next(b for b in at.button if b.label == "Save names").click().run()
    assert project.class_names() == {"1": "Person in photo"}
    # Everything is on disk: a fresh session sees the same numbers.
    again = _app(project.slug).run()
    again.switch_page("app_pages/steps/data.py").run()
    assert {m.label: m.value for m in again.metric}["Labelled"] == "12"


def test_theme_charts_and_report_share_one_palette():
    """A class keeps its colour on every page, in the charts and in the exported report."""
    import tomllib

    from core.present import charts

    theme = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())["theme"]
    assert theme["chartCategoricalColors"] == charts.PALETTE
    assert theme["primaryColor"] == charts.PALETTE[0]
    assert (REPO / "assets" / "logo.png").is_file()


@pytest.mark.parametrize("page", ["backbone", "train", "explore", "tag", "report"])
def test_a_step_that_is_not_ready_links_to_the_step_it_asks_for(project, page):
    """The empty Report said "First: train a model on the Train & compare step" and linked to
    the Tag catalog step (the previous one); the link goes where the sentence sends you."""
    at = _app(project.slug).run()
    at.switch_page(f"app_pages/steps/{page}.py").run()
    assert not at.exception, at.exception
    first = next(i.value for i in at.info if "**First:**" in i.value)
    go = [e.proto.label for e in at.get("page_link") if e.proto.label.startswith("Go to ")]
    assert len(go) == 1 and go[0].split(" · ", 1)[1] in first, (go, first)


def test_data_page_counts_products_and_lets_the_analyst_choose_the_column(tmp_path):
    """A sheet with a product column: the Data page finds it, says how many products there are
    and that their photos stay together; the analyst can switch it off for near-duplicates."""
    from skimage import data

    from core.projects import intake
    from tests.conftest import photo_project, sample_photo_set, shown

    sheet = sample_photo_set(tmp_path / "photos", {"person": [data.astronaut()],
                                                  "no_person": [data.coffee(), data.chelsea()]}, per_class=6)
    head, *rows = sheet.strip().split("\n")
    sheet = "\n".join([head + ",product_id"] + [f"{r},shoe-{i // 2}" for i, r in enumerate(rows)]) + "\n"
    p = photo_project("Shoes", tmp_path / "photos", sheet)
    assert intake.sheet_state(p).group_column == "product_id"
    at = _app(p.slug).run()
    at.switch_page("app_pages/steps/data.py").run()
    assert not at.exception, at.exception
    captions = shown(" ".join(c.value for c in at.caption))
    assert "12 labelled photos belong to 6 products (column “product_id”)" in captions
    assert "12 photos share their product with another photo" in captions
    box = next(s for s in at.selectbox if s.label.startswith("Column with the product"))
    assert box.value == "product_id"
    box.set_value("(none: find near-duplicate photos instead)")
    next(b for b in at.button if b.label == "Use these columns").click().run()
    assert not at.exception, at.exception
    assert intake.sheet_state(p).group_column is None
    assert "Near-duplicate photos (several shots of one product) are looked for once" in " ".join(
        c.value for c in at.caption)


def test_fix_labels_table_shows_the_class_names_given_on_the_data_page(tmp_path):
    """The sheet said yes/no; once named, the Fix labels table offers "Model in shot", not "yes"."""
    import json

    from tests.conftest import photo_project

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = ["file,label"]
    for i in range(6):
        Image.new("RGB", (40, 30), (i * 40, 10, 200 - i * 30)).save(folder / f"p{i}.jpg")
        rows.append(f"p{i}.jpg,{'yes' if i % 2 else 'no'}")
    project = photo_project("Model in shot", folder, "\n".join(rows) + "\n")
    project.set_class_names({"yes": "Model in shot", "no": "No model"})
    at = _app(project.slug).run()
    at.switch_page("app_pages/steps/data.py").run()
    assert not at.exception, at.exception
    editor = next(d for d in at.main.get("dataframe") if "label" in json.loads(d.proto.columns))
    options = json.loads(editor.proto.columns)["label"]["type_config"]["options"]
    assert {o["value"]: o["label"] for o in options} == {"yes": "Model in shot", "no": "No model"}
