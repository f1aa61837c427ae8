"""Calibrated confidence: the error it fixes on real features, and that it travels with the model."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from core.learning import bundles
from core.learning.calibration import (
    Calibration,
    apply_calibration,
    fit_calibration,
    reliability,
    reliability_sentence,
)
from core.learning.evaluation import choose_threshold
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def everyday_features(tmp_path_factory):
    """Lite0 features of the 39 everyday photos with a person and 81 without (real photos)."""
    folder = SHARED_DATA / "everyday-photos"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"shared photos not found at {folder} (a fresh clone has no ../shared)")
    from core.vision.features import extract_features
    from core.vision.store import FeatureStore

    with open(folder / "labels.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["file"])
    person = [r for r in rows if r["label"] == "person"]
    rows = person + [r for r in rows if r["label"] != "person"][: 120 - len(person)]
    store = FeatureStore(tmp_path_factory.mktemp("features"))
    items = [(r["file"], folder / r["file"]) for r in rows]
    result = extract_features(items, backbone_id="efficientnet_lite0", store=store)
    assert not result.failed
    X = store.load(result.key, [k for k, _ in items])
    return X, np.array(["person" if r["label"] == "person" else "no_person" for r in rows])


def test_calibration_lowers_the_expected_calibration_error_on_real_features(everyday_features):
    """A strongly regularised head (what inner cross-validation picks on small data, here with
    balanced class weights) states about 50 % for every everyday photo; a calibration fitted on
    one half of its out-of-fold predictions makes the other half's confidence honest."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from core.learning.heads import make_frozen_head

    X, y = everyday_features
    classes = ["no_person", "person"]
    oof = cross_val_predict(make_frozen_head(C=1e-3), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                            method="predict_proba")
    for fit, held in StratifiedKFold(2, shuffle=True, random_state=0).split(X, y):
        cal = fit_calibration(y[fit], oof[fit], classes=classes, positive="person")
        assert cal is not None and cal.positive == 1
        t_raw = choose_threshold(y[fit], oof[fit][:, 1], positive="person")
        t_cal = choose_threshold(y[fit], cal.apply(oof[fit])[:, 1], positive="person")
        before = reliability(y[held], oof[held], classes=classes, positive="person", threshold=t_raw)["ece"]
        after = reliability(y[held], cal.apply(oof[held]), classes=classes, positive="person", threshold=t_cal)["ece"]
        assert after < 0.8 * before, (before, after)
        # monotone: the same photos get the tag at the re-chosen threshold
        assert ((oof[fit][:, 1] >= t_raw) == (cal.apply(oof[fit])[:, 1] >= t_cal)).all()


def test_calibration_keeps_the_decisions_and_is_refused_when_it_would_not_help():
    rng = np.random.default_rng(0)
    p_b = rng.uniform(0.05, 0.95, 400)
    y = np.where(rng.random(400) < p_b, "b", "a")  # honest: "b" comes true as often as p_b says
    honest = np.column_stack([1 - p_b, p_b])
    # overconfident copies of the same scores: sharpened log-odds
    sharp = apply_calibration(honest, Calibration(temperature=0.25, bias=0.0, positive=1, fitted_on="", n=0))
    cal = fit_calibration(y, sharp, classes=["a", "b"], positive="b")
    assert cal is not None and cal.temperature > 2
    assert reliability(y, cal.apply(sharp), classes=["a", "b"])["ece"] < reliability(y, sharp, classes=["a", "b"])["ece"]
    # three classes: only a temperature, so the most probable class stays the most probable
    p3 = rng.dirichlet([0.3, 0.3, 0.3], 300)
    y3 = np.array(["x", "y", "z"])[p3.argmax(axis=1)]
    c3 = fit_calibration(y3, p3, classes=["x", "y", "z"])
    if c3 is not None:
        assert (c3.apply(p3).argmax(axis=1) == p3.argmax(axis=1)).all()
    # too few photos, or nothing to gain: no calibration
    assert fit_calibration(y, honest, classes=["a", "b"], positive="b") is None
    assert fit_calibration(y[:10], honest[:10], classes=["a", "b"]) is None
    # unreadable photos (NaN rows) stay NaN
    with_nan = np.vstack([sharp[:3], [np.nan, np.nan]])
    assert np.isnan(cal.apply(with_nan)[3]).all() and np.isfinite(cal.apply(with_nan)[:3]).all()


def test_reliability_bins_and_plain_sentence():
    y = np.array(["b"] * 9 + ["a"] + ["a"] * 5 + ["b"] * 5)
    p = np.array([[0.05, 0.95]] * 10 + [[0.4, 0.6]] * 10)  # 95 % sure: right 9 of 10; 60 %: right 5 of 10
    rel = reliability(y, p, classes=["a", "b"], positive="b", threshold=0.5)
    assert [b["n"] for b in rel["bins"]] == [10, 10]
    assert rel["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.1)
    text = reliability_sentence(rel)
    assert "confidence is 90 % or more" in text and "right 90 %" in text and "7.5 points" in text


def test_a_bundle_carries_its_calibration_and_refuses_a_broken_one(tmp_path):
    from core.learning.heads import head_to_arrays, make_frozen_head
    from core.vision import backbones

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 8)), np.array(["a", "b"] * 20)
    head = make_frozen_head(C=1.0).fit(X, y)
    cal = Calibration(temperature=1.7, bias=-0.4, positive=1, fitted_on="cross-validation", n=40)
    bundle = bundles.ModelBundle(kind="frozen", backbone_id="efficientnet_lite0", weights_hash="0" * 64,
                                 preprocessing=backbones.preprocessing_record("efficientnet_lite0"),
                                 classes=["a", "b"], positive="b", threshold=0.4, calibration=cal.to_dict())
    path = bundles.save_bundle(bundle, head_to_arrays(head), tmp_path / "m.zip")
    loaded, _ = bundles.load_bundle(path)
    assert Calibration.from_dict(loaded.calibration) == cal
    again, _ = bundles.load_bundle(_write(tmp_path / "r.zip", bundles.repack(path, threshold=0.3)))
    assert again.calibration == loaded.calibration and again.threshold == 0.3
    bundle.calibration = {**cal.to_dict(), "temperature": -1.0}
    with pytest.raises(bundles.BundleError, match="calibration"):
        bundles.save_bundle(bundle, head_to_arrays(head), tmp_path / "bad.zip")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
