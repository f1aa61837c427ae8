"""Evaluation: reports with intervals, thresholds, cross-validation of frozen heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from core.learning.crossval import cross_validate_head
from core.learning.evaluation import (
    EvalReport,
    choose_threshold,
    evaluate_predictions,
    predict_labels,
    range_text,
)
from core.learning.heads import make_frozen_head
from core.learning.splits import plan_split
from tests.evaluation_data import NAMES, features, json_round_trip, noisy_proba


@pytest.mark.parametrize("k", [2, 3])
def test_report_matches_sklearn_and_round_trips(k):
    classes = list(NAMES[:k])
    y = NAMES[np.random.default_rng(0).integers(0, k, 300)]
    proba = noisy_proba(y, classes, accuracy=0.8)
    rep = evaluate_predictions(y, proba, classes=classes)
    pred = predict_labels(proba, classes=classes)
    assert rep.accuracy.value == pytest.approx(accuracy_score(y, pred))
    assert rep.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(y, pred))
    assert rep.macro_f1.value == pytest.approx(f1_score(y, pred, average="macro"))
    assert rep.confusion.sum() == 300 and rep.confusion.shape == (k, k)
    assert list(rep.report.index[:k]) == classes and rep.report.loc[classes[0], "support"] == np.sum(y == classes[0])
    back = EvalReport.from_dict(json_round_trip(rep.to_dict()))
    assert back.report.equals(rep.report) and np.array_equal(back.confusion, rep.confusion)
    assert back.accuracy == rep.accuracy
    if k == 2:
        assert rep.positive == "person" and rep.threshold == 0.5 and 0.7 < rep.roc_auc <= 1
        assert rep.average_precision is not None and len(rep.roc["fpr"]) == len(rep.roc["thresholds"])
    else:
        assert rep.roc is None and rep.positive is None


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (100, 2000):
        y = NAMES[np.random.default_rng(n).integers(0, 2, n)]
        rep = evaluate_predictions(y, noisy_proba(y, list(NAMES[:2]), accuracy=0.8, seed=n), classes=NAMES[:2])
        for est in (rep.accuracy, rep.balanced_accuracy, rep.macro_f1):
            assert est.low <= est.value <= est.high
        widths.append(rep.accuracy.high - rep.accuracy.low)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): sqrt(20) = 4.5


def test_small_test_set_is_flagged_and_threshold_is_used():
    y = np.array(["no person"] * 12 + ["person"] * 11)
    p = np.column_stack([1 - np.linspace(0, 1, 23), np.linspace(0, 1, 23)])
    rep = evaluate_predictions(y, p, classes=NAMES[:2], threshold=0.9)
    assert any("23 photos is not evidence" in w for w in rep.warnings)
    assert rep.confusion[1, 1] == int(np.sum(p[:, 1] >= 0.9))
    # one figure, one range, one wording: the warning quotes the headline's (balanced accuracy)
    # range as every caption writes it; it said "accuracy anywhere from 63 % to 100 %" beside
    # "95 % range 66.7 – 100.0 %" before
    bal = rep.balanced_accuracy
    assert bal.low != rep.accuracy.low  # the two figures' ranges differ here, so the test can tell them apart
    warning = next(w for w in rep.warnings if "not evidence" in w)
    assert f"balanced accuracy {range_text(bal.low, bal.high)}" in warning and "anywhere" not in warning
    assert range_text(0.667, 1.0) == "95 % range 66.7 to 100.0 %" and range_text(None, 1.0) == ""
    assert range_text(-3.3, 6.7, points=True) == "95 % range \u22123.3 to +6.7 points"
    with pytest.raises(ValueError, match="only applies to two-class"):
        predict_labels(np.full((2, 3), 1 / 3), classes=NAMES, threshold=0.5)


def test_choose_threshold():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.15  # rare positives with under-confident scores
    s = np.clip(np.where(y, 0.35, 0.1) + rng.normal(0, 0.05, 400), 0, 1)
    t = choose_threshold(y, s)
    assert 0.15 < t < 0.3
    assert balanced_accuracy_score(y, s >= t) > balanced_accuracy_score(y, s >= 0.5) + 0.3
    assert choose_threshold(np.where(y, "person", "no person"), s, positive="person") == t
    assert 0 < choose_threshold(y, s, rule="f1") < 1
    assert choose_threshold(np.ones(5, bool), np.linspace(0, 1, 5)) == 0.5
    with pytest.raises(ValueError, match="positive="):
        choose_threshold(np.array(["a", "b"]), [0.1, 0.9])


# --------------------------------------------------------------------------- cross-validation


@pytest.mark.parametrize("k", [2, 3])
def test_cross_validate_head(k):
    X, y, ids = features(n=150, k=k)
    plan = plan_split(ids, y, n_repeats=2)
    seen = []
    res = cross_validate_head(X, y, plan=plan, on_progress=lambda d, t: seen.append((d, t)))
    assert res.oof_proba.shape == (150, k) and np.all(np.isfinite(res.oof_proba))
    np.testing.assert_allclose(res.oof_proba.sum(axis=1), 1.0)
    assert len(res.fold_scores) == 2 * plan.n_splits and seen[-1] == (seen[-1][1],) * 2
    s = res.summary["balanced_accuracy"]
    assert s["low"] <= s["mean"] <= s["high"] and s["mean"] > 0.8
    assert res.test_report.n == len(plan.test_ids) and res.test_report.accuracy.value > 0.75
    assert res.in_test.sum() == len(plan.test_ids)
    np.testing.assert_array_equal(res.oof_proba[res.in_test], res.test_proba)
    assert (res.threshold is not None) == (k == 2)
    assert "cross-validation" in res.headline()
    json.dumps(res.to_dict(), allow_nan=False)


def test_cross_validate_head_follows_the_callers_row_order():
    X, y, ids = features(n=100)
    plan = plan_split(ids, y, n_repeats=1)
    head = lambda: make_frozen_head(C=0.1)  # noqa: E731
    res = cross_validate_head(X, y, plan=plan, make_head=head)
    perm = np.random.default_rng(1).permutation(100)
    res_p = cross_validate_head(X[perm], y[perm], plan=plan, ids=[ids[i] for i in perm], make_head=head)
    np.testing.assert_allclose(res_p.oof_proba, res.oof_proba[perm])
    with pytest.raises(ValueError, match="do not match the split plan"):
        cross_validate_head(X[:-1], y[:-1], plan=plan, ids=ids[:-1], make_head=head)


# --------------------------------------------------------------------------- comparison



def test_a_perfect_score_on_few_photos_still_has_an_honest_range():
    """32 of 32 right does not prove 100 %: the interval must reach well below it."""
    from core.learning.comparison import compare_methods
    from core.learning.evaluation import evaluate_predictions

    y = ["a"] * 16 + ["b"] * 16
    p = np.array([[1.0, 0.0]] * 16 + [[0.0, 1.0]] * 16)
    report = evaluate_predictions(y, p, classes=["a", "b"])
    assert report.accuracy.value == 1.0 and report.accuracy.low < 0.95
    big = evaluate_predictions(y * 50, np.vstack([p] * 50), classes=["a", "b"])
    assert big.accuracy.low > report.accuracy.low  # more photos, narrower range
    same = compare_methods(y, p, p, classes=["a", "b"])
    assert same.better is None and same.difference.low < -2 and same.difference.high > 2
