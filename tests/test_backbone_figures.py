"""The measured figures of the offline networks: stored by the benchmark, shown on the Backbone page."""

from __future__ import annotations

import json

import pytest

from core.vision import backbones as bb
from core.vision import figures
from tests.conftest import REPO, photo_project, sample_photo_set


def _row(backbone, variant, everyday, catalog, flat):
    return {
        "backbone": backbone,
        "variant": variant,
        "flatlay_person": flat,
        "flatlay_n": 300,
        "relative_time": 1.0,
        "everyday": {"mean": everyday, "low": everyday - 0.05, "high": min(1.0, everyday + 0.05), "test": everyday},
        "catalog": {"mean": catalog, "low": None, "high": None, "test": catalog},
    }


def test_saved_figures_come_back_in_plain_words(tmp_path):
    path = tmp_path / "figures.json"
    assert figures.figures_table(path) is None and figures.figures_note(path) is None  # nothing measured
    rows = [
        _row("efficientnet_lite0", "squash", 0.861, 0.995, 2),
        _row("efficientnet_lite0", "center", 0.80, 0.99, 5),  # not how the app prepares photos: not shown
        _row("efficientnet_lite2", "squash", 0.912, 1.0, 0),
        _row("retired_network", "squash", 0.5, 0.5, 9),  # no longer in the registry: not shown
    ]
    figures.save_figures(
        rows, {"efficientnet_lite0": 41.26, "efficientnet_lite2": 19.7}, machine="a test machine", path=path
    )
    assert json.loads(path.read_text())["rows"][2]["everyday"]["mean"] == pytest.approx(0.912)
    table = figures.figures_table(path)
    assert table["Network"].tolist() == ["EfficientNet-Lite0", "EfficientNet-Lite2"]
    lite0 = table.iloc[0].to_dict()
    assert lite0["Everyday photos (balanced accuracy)"] == "86 % (95 % range 81 to 91 %)"
    assert lite0["Catalog photos (balanced accuracy)"] == "99.5 %"  # never rounded up to 100 %; no range
    assert lite0["Flat-lay photos wrongly called 'person'"] == "2 of 300"
    assert lite0["Speed measured"] == "41 photos/s"
    assert "a test machine" in figures.figures_note(path)


def test_shipped_figures_cover_every_offline_network_and_name_the_default_best():
    data = figures.measured_figures()
    assert data is not None, "run benchmarks/bench_backbones.py score --write"
    measured = {r["backbone"] for r in data["rows"]}
    assert {b.id for b in bb.list_backbones() if b.offline} <= measured
    shown = {r["backbone"]: r for r in data["rows"] if r["variant"] == figures.headline_variant(r["backbone"])}
    best = max(shown, key=lambda b: shown[b]["everyday"]["mean"])
    default = shown[bb.DEFAULT_BACKBONE_ID]
    # The default is the best trade-off: within the noise of the best on everyday photos...
    assert default["everyday"]["mean"] >= shown[best]["everyday"]["low"]
    # ...and no worse than the others on catalog photos.
    assert default["catalog"]["mean"] >= max(r["catalog"]["mean"] for r in shown.values()) - 0.01


def test_backbone_page_shows_the_measured_figures(tmp_path):
    from skimage import data
    from streamlit.testing.v1 import AppTest

    sheet = sample_photo_set(tmp_path / "photos", {"cat": [data.chelsea()], "coffee": [data.coffee()]}, per_class=4)
    project = photo_project("Figures", tmp_path / "photos", sheet)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["project"] = project.slug
    at.run()
    at.switch_page("app_pages/steps/backbone.py").run()
    assert not at.exception, at.exception
    expected = figures.figures_table()
    shown = next(d.value for d in at.dataframe if "Everyday photos (balanced accuracy)" in d.value.columns)
    assert shown.reset_index(drop=True).equals(expected.reset_index(drop=True))
    assert "EfficientNet-Lite2" in shown["Network"].tolist()
    note = " ".join(c.value for c in at.caption)
    assert figures.measured_figures()["machine"] in note and "300 everyday photos" in note


def test_benchmark_counts_flat_lay_calls_on_the_scale_of_the_threshold():
    """The app's threshold is chosen on calibrated confidences, so the benchmark's count of flat-lay
    photos called "person" must calibrate too (it compared raw probabilities with it: 9 calls where
    the app's model makes 5)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from benchmarks.bench_backbones import person_confidence
    from core.learning.calibration import Calibration, apply_calibration

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = np.where(X[:, 0] + 0.3 * rng.normal(size=60) > 0, "person", "no_person")
    head = LogisticRegression().fit(X, y)
    calibration = Calibration(temperature=2.5, bias=-1.0, positive=1, fitted_on="cross-validation", n=60).to_dict()
    raw = head.predict_proba(X)[:, 1]
    stated = person_confidence(head, calibration, X)
    assert np.allclose(stated, apply_calibration(head.predict_proba(X), calibration)[:, 1])
    assert (stated >= 0.5).sum() < (raw >= 0.5).sum()  # a real difference in the count
    assert np.array_equal(person_confidence(head, None, X), raw)
