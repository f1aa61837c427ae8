"""The management report and the demo command, on real photos and the offline EfficientNet-Lite0.

One demo project (every step done, a catalog with a category column) is built through
``python -m core demo``; a second project has no tagged catalog; a third has three classes.
"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from core import tagging
from core.cli import main as cli
from core.learning import extraction, runs, training
from core.present import journey, report, report_html
from core.projects import workspace
from core.projects.state import ProjectState
from tests.conftest import photo_project, sample_photo_set


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("report-home")
    mp.setenv("CATALOG_LENS_HOME", str(root))
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def workspace_home(home, monkeypatch):  # the module's workspace for every test here
    monkeypatch.setenv("CATALOG_LENS_HOME", str(home))


@pytest.fixture(scope="module")
def binary_photos(home):
    from skimage import data

    folder = home / "photos"
    sheet = sample_photo_set(folder, {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea(), data.rocket()]}, 10)
    (home / "labels.csv").write_text(sheet)
    return folder, home / "labels.csv"


@pytest.fixture(scope="module")
def demo(home, binary_photos):
    """A finished project from the demo command, with a catalog split into two categories."""
    folder, sheet = binary_photos
    names = sorted(p.name for p in folder.iterdir())
    catalog = home / "catalog.csv"
    catalog.write_text("sku;category;image\n" + "".join(
        f"S{i};{'Menswear' if i % 2 else 'Accessories'};{n}\n" for i, n in enumerate(names)) + "S99;Accessories;gone.jpg\n")
    code = cli(["demo", "--images", str(folder), "--labels", str(sheet), "--project", "Person demo",
                "--class-name", "person=Person in photo", "--catalog", str(catalog), "--epochs", "1", "--json"])
    assert code == 0
    return workspace.open_project("person-demo")


class _Refs(HTMLParser):
    """Every tag and every address an HTML page would load or link to."""

    def __init__(self):
        super().__init__()
        self.tags, self.addresses = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.addresses += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "poster", "action") and v]


def assert_self_contained(page: str) -> None:
    refs = _Refs()
    refs.feed(page)
    assert not refs.tags & {"script", "link", "iframe", "object", "embed", "base"}
    assert refs.addresses and all(a.startswith("data:") for a in refs.addresses), refs.addresses[:5]
    lowered = page.lower()
    assert "@import" not in lowered and "url(" not in lowered and "http://" not in lowered and "https://" not in lowered


def test_demo_builds_a_finished_project(demo):
    done = journey.progress(demo).done
    assert all(done[step] for step in ("data", "backbone", "train", "explore", "tag")) and not done["report"]
    assert set(runs.latest_runs(demo)) == {"frozen", "finetuned"}
    folder = tagging.project_run_folder(demo, ProjectState(demo).tagging_run)
    results = tagging.results_frame(folder)
    assert len(results) == 21 and (results["predicted_label"] == "").sum() == 1  # gone.jpg says why
    assert "gone.jpg" in results["tag_error"].iloc[-1]


def test_demo_refuses_to_overwrite_a_project(binary_photos, capsys):
    folder, sheet = binary_photos
    workspace.create_project("Taken")
    assert cli(["demo", "--images", str(folder), "--labels", str(sheet), "--project", "Taken"]) == 2
    assert "--replace" in capsys.readouterr().err


def test_report_of_a_finished_binary_project(demo):
    built = report.build_report(demo)
    assert built.question == "Does the photo show “Person in photo”?"
    # every labelled photo it used: learned from, chosen and calibrated on, or held out
    assert list(built.classes) == ["Person in photo", "no_person"] and sum(built.classes.values()) == 20
    assert all(len(p) == report.EXAMPLES_PER_CLASS for p in built.examples.values())
    assert [m.kind for m in built.methods] == ["frozen", "finetuned"]
    assert sum(m.used_for_tagging for m in built.methods) == 1
    assert built.verdict and "Fine-tuned network" in built.verdict
    plain = next(line for line in built.in_short if "was also tried" in line)  # the verdict for a manager
    assert "points" not in plain or "more photos right" in plain
    frozen = built.methods[0]
    assert frozen.accuracy["low"] <= frozen.accuracy["value"] <= frozen.accuracy["high"]
    assert "Of every 100 photos that show “Person in photo”" in frozen.detail
    assert int(frozen.per_class["photos"].sum()) == frozen.n_test == built.held_out
    cat = built.catalog
    assert cat is not None and cat.finished and cat.rows == 21 and sum(cat.counts.values()) == 21
    assert cat.counts[report.NOT_TAGGED] == 1 and cat.failed == 1
    assert cat.category_column == "category"
    assert set(cat.by_category.index) == {"Menswear", "Accessories"} and int(cat.by_category.to_numpy().sum()) == 21
    assert any(cat.examples.values())
    assert any("could not be tagged" in limit for limit in built.limits)


def test_exported_html_is_self_contained_and_says_what_the_page_says(demo, tmp_path):
    out = tmp_path / "report.html"
    assert cli(["report", "--project", "Person demo", "--out", str(out), "--json"]) == 0
    page = out.read_text()
    assert_self_contained(page)
    built = report.build_report(demo)
    for text in [built.question, *built.in_short, *built.limits, built.catalog.summary, "Menswear", "Accessories"]:
        assert report_html._e(text) in page
    assert page.count("<img") >= 1 + 2 * report.EXAMPLES_PER_CLASS  # the logo, examples, catalog photos
    assert journey.progress(demo).done["report"]


def test_analysts_answers_and_wording_reach_the_report(demo):
    folder = tagging.project_run_folder(demo, ProjectState(demo).tagging_run)
    results = tagging.results_frame(folder)
    row = int(results.index[results["predicted_label"] == "person"][0])
    tagging.set_override(folder, row, "no_person")
    ProjectState(demo).save_report_choices(question="Is a model wearing the product?", category="")
    learned = report.build_report(demo).classes
    try:
        built = report.build_report(demo)
        assert built.catalog.answered == 1 and built.catalog.by_category is None
        assert built.catalog.counts["no_person"] == int((results["predicted_label"] == "no_person").sum()) + 1
        assert "Is a model wearing the product?" in report_html.to_html(built)
        assert not any("changed since this model was trained" in limit for limit in built.limits)
        tagging.add_reviews_to_training(demo, folder)  # the answer relabels that photo...
        built = report.build_report(demo)
        assert built.classes == learned == {"Person in photo": 10, "no_person": 10}  # ...which the model learned as it was
        assert "now 9 “Person in photo”, 11 “no_person”; then 10 “Person in photo”, 10 “no_person”" in built.limits[0]

        from streamlit.testing.v1 import AppTest

        from tests.conftest import REPO

        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.query_params["project"] = demo.slug
        at.run()
        at.switch_page("app_pages/steps/train.py").run()  # the Train page says so too
        assert not at.exception, at.exception
        assert any("The labels have changed since this model was trained" in w.value for w in at.warning)
    finally:
        tagging.set_override(folder, row, None)
        for sha in demo.dataset().query("label_source == 'manual'")["sha"]:
            demo.clear_override(sha)
        ProjectState(demo).save_report_choices(question="", category="category")


def test_a_failed_row_answered_by_hand_is_tagged_everywhere_in_the_report(demo):
    """After a review answer for a row that could not be tagged, the catalog figures said
    "could not be tagged: 0" while "What was not checked" still said "1 row could not be tagged"."""
    folder = tagging.project_run_folder(demo, ProjectState(demo).tagging_run)
    results = tagging.results_frame(folder)
    row = int(results.index[results["predicted_label"] == ""][0])
    tagging.set_override(folder, row, "no_person")
    try:
        built = report.build_report(demo)
        assert built.catalog.counts.get(report.NOT_TAGGED, 0) == 0 and built.catalog.failed == 0
        assert not any("could not be tagged" in line for line in [*built.limits, *built.in_short, built.catalog.summary])
    finally:
        tagging.set_override(folder, row, None)


def test_a_relabelling_that_keeps_the_counts_is_still_a_change(demo):
    frozen = runs.latest_runs(demo)["frozen"]
    assert runs.labels_changed(demo, frozen) is None
    data = demo.training_set()
    person = data.loc[data["label"] == "person", "sha"].iloc[0]
    other = data.loc[data["label"] == "no_person", "sha"].iloc[0]
    demo.set_override(person, label="no_person")
    demo.set_override(other, label="person")  # 10 and 10 before and after
    try:
        changed = runs.labels_changed(demo, frozen)
        assert changed.startswith("The labels have changed since this model was trained:")
    finally:
        demo.clear_override(person)
        demo.clear_override(other)
    assert runs.labels_changed(demo, frozen) is None


def test_report_without_a_tagged_catalog(home, binary_photos):
    folder, sheet = binary_photos
    p = photo_project("No catalog yet", folder, sheet.read_bytes())
    with pytest.raises(Exception, match="trained model"):
        report.build_report(p)
    extraction.extract_project(p, "efficientnet_lite0")
    training.train_frozen(p)
    built = report.build_report(p)
    assert built.catalog is None and built.verdict is None and len(built.methods) == 1
    assert "No catalog has been tagged yet." in built.in_short
    assert any("Only the quick model was trained" in limit for limit in built.limits)
    page = report_html.to_html(built)
    assert_self_contained(page)
    assert "No catalog has been tagged yet." in page


def test_report_of_a_three_class_project(home):
    from skimage import data

    folder = home / "three"
    sheet = sample_photo_set(folder, {"astronaut": [data.astronaut()], "coffee": [data.coffee()], "cat": [data.chelsea()]}, 8)
    p = photo_project("Three classes", folder, sheet)
    extraction.extract_project(p, "efficientnet_lite0")
    training.train_frozen(p)
    built = report.build_report(p)
    assert built.question.startswith("Which of these does the photo show:")
    method = built.methods[0]
    assert method.detail == "" and len(method.per_class) == 3
    assert len(method.confusion) == 3 and all(len(r) == 3 for r in method.confusion)
    assert sum(map(sum, method.confusion)) == method.n_test
    page = report_html.to_html(built)
    assert_self_contained(page)
    assert page.count("really “") == 3

    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["project"] = p.slug
    at.run()
    at.switch_page("app_pages/steps/report.py").run()
    assert not at.exception, at.exception
    assert "Which of these does the photo show" in at.info[0].value and not at.warning
    assert any("No catalog has been tagged yet" in i.value for i in at.info)


def test_report_page_draws_the_report_and_offers_the_file(demo):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["project"] = demo.slug
    at.run()
    at.switch_page("app_pages/steps/report.py").run()
    assert not at.exception, at.exception
    headers = [h.value for h in at.header]
    assert headers == ["What it learned from", "How well it works", "The catalog now", "What was not checked"]
    assert any("Person in photo" in i.value for i in at.info)
    assert [b.label for b in at.get("download_button")] == ["Download the report (HTML)"]
    assert len(at.get("plotly_chart")) >= 4  # classes, two confusion matrices, catalog, categories
    at.text_input(key=f"report-question-{demo.slug}").set_value("Is a model wearing it?").run()
    assert not at.exception, at.exception
    assert any("Is a model wearing it?" in i.value for i in at.info)
    assert ProjectState(demo).report_choices.question == "Is a model wearing it?"
    ProjectState(demo).save_report_choices(question="")


def test_report_page_before_training_says_what_it_needs(home):
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO

    p = workspace.create_project("Empty")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.query_params["project"] = p.slug
    at.run()
    at.switch_page("app_pages/steps/report.py").run()
    assert not at.exception, at.exception
    assert "train a model" in at.info[0].value


def test_report_cli_names_an_unknown_project(capsys, tmp_path):
    assert cli(["report", "--project", "nope", "--out", str(tmp_path / "r.html")]) == 2
    assert "No project named 'nope'" in capsys.readouterr().err

