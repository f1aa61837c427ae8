"""core.learning.models: the threshold the analyst chooses is the one that tags, everywhere.

Real photos (scikit-image's samples), the real offline EfficientNet-Lite0, a real frozen
model. The threshold is chosen so that it changes some photos' labels against the model's
own, then followed through the Tag page, the command line, the exported model file and
the report. Before models owned the choice (keyed by model id), tagging used the model
file's own threshold and these tests failed.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from core import cli, tagging
from core.learning import bundles, extraction, models, predictor, runs, training
from core.present import journey, report
from core.projects import jobs
from core.projects.state import ProjectState
from core.vision import features
from tests.conftest import REPO, photo_project, sample_photo_set


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from skimage import data

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("models-home")
    mp.setenv("CATALOG_LENS_HOME", str(home))
    folder = home / "photos"
    sheet = sample_photo_set(folder, {"person": [data.astronaut()],
                                      "no_person": [data.coffee(), data.chelsea(), data.rocket()]})
    project = photo_project("Threshold", folder, sheet)
    extraction.extract_project(project, "efficientnet_lite0")
    run = training.train_frozen(project)
    names = sorted(p.name for p in folder.glob("*.jpg"))
    table = predictor.predict_images(run.bundle_path, [(n, folder / n) for n in names])
    score = table[f"proba_{run.positive}"].to_numpy()
    top = np.unique(score)[-2:]
    chosen = float(top.mean())  # between the two surest photos: the others change label
    other = next(c for c in run.classes if c != run.positive)
    expected = [run.positive if s >= chosen else other for s in score]
    own = [run.positive if s >= run.threshold else other for s in score]
    assert expected != own, "the chosen threshold must change some labels for this test to mean anything"
    catalog = home / "catalog.csv"
    catalog.write_text("sku,image\n" + "".join(f"S{i},{n}\n" for i, n in enumerate(names)))
    yield {"project": project, "run": run, "chosen": chosen, "expected": expected, "catalog": catalog,
           "names": names, "folder": folder, "home": home}
    mp.undo()


@pytest.fixture(autouse=True)
def workspace_home(trained, monkeypatch):  # the module's workspace for every test here
    monkeypatch.setenv("CATALOG_LENS_HOME", str(trained["home"]))


def _app(project, page: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.query_params["project"] = project.slug
    at.run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_train_page_keeps_the_chosen_setting_for_that_model(trained):
    project, run = trained["project"], trained["run"]
    at = _app(project, "app_pages/steps/train.py")
    slider = at.slider(key="thr-frozen")  # confidence is shown in % everywhere (it showed 0.49 before)
    assert "%" in slider.proto.format and slider.value == round(100 * run.threshold)
    slider.set_value(90).run()
    next(b for b in at.button if b.label == "Use this setting for tagging").click().run()
    assert not at.exception, at.exception
    assert models.threshold(project, run.id) == pytest.approx(0.9)
    assert models.tagging_model(project)["threshold"] == pytest.approx(0.9)
    assert models.get_model(project, run.id)["own_threshold"] == run.threshold


def test_tag_page_tags_with_the_chosen_threshold(trained):
    project, run = trained["project"], trained["run"]
    models.set_threshold(project, run.id, trained["chosen"])
    at = _app(project, "app_pages/steps/tag.py")
    at.file_uploader[0].set_value([("catalog.csv", trained["catalog"].read_bytes(), "text/csv")]).run()
    review = at.slider(key="review_below")
    assert "%" in review.proto.format and review.value == 75  # in %, as confidence is explained
    review.set_value(80).run()
    next(b for b in at.button if b.label == "Start tagging").click().run()
    assert not at.exception, at.exception
    done = jobs.wait(project, jobs.latest(project, "tag").id, timeout=300)
    assert done.status == "done", done.error
    folder = tagging.project_run_folder(project, ProjectState(project).tagging_run)
    assert tagging.load_run(folder)["options"]["review_below"] == pytest.approx(0.8)
    assert tagging.load_run(folder)["threshold"] == pytest.approx(trained["chosen"])
    assert tagging.results_frame(folder)["predicted_label"].tolist() == trained["expected"]
    assert journey.progress(project).done["tag"]


def test_command_line_tags_a_project_with_its_chosen_threshold(trained, tmp_path, capsys):
    project, run = trained["project"], trained["run"]
    models.set_threshold(project, run.id, trained["chosen"])
    out = tmp_path / "tagged.csv"
    code = cli.main(["tag", "--project", project.slug, "--catalog", str(trained["catalog"]),
                     "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    with open(out, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["predicted_label"] for r in rows] == trained["expected"]
    assert {r["model_id"] for r in rows} == {run.id}


def test_exported_model_carries_the_chosen_threshold(trained, tmp_path):
    project, run = trained["project"], trained["run"]
    models.set_threshold(project, run.id, trained["chosen"])
    path = tmp_path / "model.zip"
    path.write_bytes(models.export_bundle(project, run.id))
    bundle, _ = bundles.load_bundle(path)
    assert bundle.threshold == pytest.approx(trained["chosen"])
    assert bundle.metrics["threshold_of_training"] == run.threshold
    table = predictor.predict_images(path, [(n, trained["folder"] / n) for n in trained["names"]])
    assert table["predicted_label"].tolist() == trained["expected"]
    models.set_threshold(project, run.id, None)  # back to the model's own: the file decides as trained
    path.write_bytes(models.export_bundle(project, run.id))
    assert bundles.load_bundle(path)[0].threshold == run.threshold


def test_report_and_journey_follow_the_threshold_that_tags(trained):
    """The report says a hand-set threshold is in force, and when the tagged catalog was made at
    another setting it says so and the Tag step opens again (it said "tagged with it" before)."""
    project, run = trained["project"], trained["run"]
    models.set_threshold(project, run.id, trained["chosen"])
    run_id = tagging.start_project_run(
        project, catalog_name="catalog.csv", catalog_data=trained["catalog"].read_bytes(), bundle_path=run.bundle_path,
        options=tagging.TagOptions(image_columns=["image"]), threshold=models.threshold(project, run.id))
    tagging.run_tagging(tagging.project_run_folder(project, run_id), project_files=tagging.project_photo_files(project))
    limits = " ".join(report.build_report(project).limits)
    assert "set by hand" in limits and "tag the catalog again" not in limits
    assert journey.progress(project).done["tag"]
    models.set_threshold(project, run.id, None)  # back to the model's own: the catalog is now out of date
    limits = " ".join(report.build_report(project).limits)
    assert "set by hand" not in limits
    assert "at another confidence setting" in limits and "tag the catalog again" in limits
    assert not journey.progress(project).done["tag"]
    at = _app(project, "app_pages/steps/tag.py")
    assert any("tagged at another confidence setting" in box.value for box in at.info)


def test_a_threshold_belongs_to_one_model_not_to_a_kind(trained):
    """Retraining makes a new model: it starts from its own threshold, not the old model's choice."""
    project, run = trained["project"], trained["run"]
    models.set_threshold(project, run.id, trained["chosen"])
    again = training.train_frozen(project, seed=1)
    assert again.id != run.id
    assert models.threshold(project, again.id) == again.threshold
    assert ProjectState(project).threshold(run.id) == pytest.approx(trained["chosen"])


def test_projects_made_before_keep_their_threshold_chosen_by_kind(trained):
    project = trained["project"]
    latest = runs.latest_runs(project)["frozen"]
    project.set_meta("thresholds", {"frozen": 0.8})  # as an older version stored it
    assert models.threshold(project, latest.id) == pytest.approx(0.8)


def test_predictor_reuses_the_projects_features(trained, monkeypatch):
    """Photos already extracted in the project are not computed again when tagging with it."""
    project = trained["project"]
    computed = []
    real = features.extract_features

    def counting(items, **kwargs):
        result = real(items, **kwargs)
        computed.append(result.computed)
        return result

    monkeypatch.setattr(features, "extract_features", counting)
    with models.predictor(project) as tagger:
        table = tagger.predict([(n, trained["folder"] / n) for n in trained["names"]])
    assert computed == [0] and (table["error"] == "").all()


def test_unknown_models_and_bad_thresholds_are_plain_errors(trained):
    project = trained["project"]
    run = runs.latest_runs(project)["frozen"]
    with pytest.raises(ValueError, match="no model"):
        models.set_threshold(project, "nope", 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        models.set_threshold(project, run.id, 1.5)
    with pytest.raises(ValueError, match="no model"):
        models.choose_tagging_model(project, "nope")
