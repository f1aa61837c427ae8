"""Evaluation: split plans, reports with intervals, cross-validation, comparisons, label issues."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from core.comparison import align_proba, compare_methods, rank_label_issues
from core.evaluation import (
    EvalReport,
    choose_threshold,
    cross_validate_head,
    evaluate_predictions,
    predict_labels,
)
from core.heads import make_frozen_head
from core.problems import InputError
from core.splits import SplitPlan, plan_split

NAMES = np.array(["no person", "person", "pet"])


def _data(n=200, k=2, seed=0, sep=1.5, weights=None):
    X, y = make_classification(
        n, 20, n_informative=6, n_classes=k, n_clusters_per_class=1, class_sep=sep, weights=weights, random_state=seed
    )
    return X.astype(np.float32), NAMES[y], [f"{seed}-{i:05d}" for i in range(n)]


def _json(d):
    return json.loads(json.dumps(d, allow_nan=False))


def _noisy_proba(y, classes, *, accuracy, seed=0):
    """Probabilities that pick the true class with the given accuracy."""
    rng = np.random.default_rng(seed)
    idx = np.searchsorted(classes, y)
    wrong = rng.random(len(y)) >= accuracy
    pick = np.where(wrong, (idx + rng.integers(1, len(classes), len(y))) % len(classes), idx)
    p = np.full((len(y), len(classes)), 0.1 / max(1, len(classes) - 1))
    p[np.arange(len(y)), pick] = 0.9
    return p


# --------------------------------------------------------------------------- split plans


@pytest.mark.parametrize("k", [2, 3])
def test_plan_is_stratified_disjoint_and_complete(k):
    _, y, ids = _data(n=300, k=k, weights=[0.7, 0.3] if k == 2 else None)
    plan = plan_split(ids, y, seed=3)
    train, val, test = set(plan.train_ids), set(plan.val_ids), set(plan.test_ids)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(ids)
    assert len(test) == 60
    label = dict(zip(ids, y, strict=True))
    for c in np.unique(y):
        share_all = np.mean(y == c)
        assert abs(np.mean([label[i] == c for i in test]) - share_all) < 0.03
        assert abs(np.mean([label[i] == c for i in val]) - share_all) < 0.06
    assert plan.small_data and plan.n_repeats == 5 and plan.n_splits == 5


def test_plan_is_reproducible_order_free_and_json_round_trips():
    _, y, ids = _data(n=150)
    plan = plan_split(ids, y, seed=7)
    assert plan_split(ids, y, seed=7) == plan
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = plan_split([ids[i] for i in perm], y[perm], seed=7)
    assert set(shuffled.test_ids) == set(plan.test_ids) and set(shuffled.val_ids) == set(plan.val_ids)
    assert set(plan_split(ids, y, seed=8).test_ids) != set(plan.test_ids)
    assert SplitPlan.from_dict(_json(plan.to_dict())) == plan
    broken = plan.to_dict() | {"test_ids": plan.test_ids[:-1]}
    with pytest.raises(ValueError, match="inconsistent"):
        SplitPlan.from_dict(broken)


def test_cv_folds_cover_each_training_photo_once_per_repeat():
    _, y, ids = _data(n=120, k=3)
    plan = plan_split(ids, y, n_repeats=2)
    test = set(plan.test_ids)
    splits = list(plan.cv_splits())
    assert len(splits) == 2 * plan.n_splits
    for r in range(2):
        scored = np.concatenate([s for rr, _, _, s in splits if rr == r])
        assert sorted(scored.tolist()) == sorted(i for i, pid in enumerate(ids) if pid not in test)
    for _, _, fit, score in splits:
        assert not set(fit) & set(score)
        assert not {ids[i] for i in fit} & test


def test_large_data_gets_one_pass_and_tiny_classes_are_refused():
    _, y, ids = _data(n=200)
    assert plan_split(ids, y, small_data_threshold=100).n_repeats == 1
    assert plan_split(ids, y, n_repeats=0).cv_folds == []
    y = y.copy()
    y[:2] = "pet"
    with pytest.raises(InputError, match="'pet' \\(2\\)"):
        plan_split(ids, y)


# --------------------------------------------------------------------------- reports


@pytest.mark.parametrize("k", [2, 3])
def test_report_matches_sklearn_and_round_trips(k):
    classes = list(NAMES[:k])
    y = NAMES[np.random.default_rng(0).integers(0, k, 300)]
    proba = _noisy_proba(y, classes, accuracy=0.8)
    rep = evaluate_predictions(y, proba, classes=classes)
    pred = predict_labels(proba, classes=classes)
    assert rep.accuracy.value == pytest.approx(accuracy_score(y, pred))
    assert rep.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(y, pred))
    assert rep.macro_f1.value == pytest.approx(f1_score(y, pred, average="macro"))
    assert rep.confusion.sum() == 300 and rep.confusion.shape == (k, k)
    assert list(rep.report.index[:k]) == classes and rep.report.loc[classes[0], "support"] == np.sum(y == classes[0])
    back = EvalReport.from_dict(_json(rep.to_dict()))
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
        rep = evaluate_predictions(y, _noisy_proba(y, list(NAMES[:2]), accuracy=0.8, seed=n), classes=NAMES[:2])
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
    X, y, ids = _data(n=150, k=k)
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
    X, y, ids = _data(n=100)
    plan = plan_split(ids, y, n_repeats=1)
    head = lambda: make_frozen_head(C=0.1)  # noqa: E731
    res = cross_validate_head(X, y, plan=plan, make_head=head)
    perm = np.random.default_rng(1).permutation(100)
    res_p = cross_validate_head(X[perm], y[perm], plan=plan, ids=[ids[i] for i in perm], make_head=head)
    np.testing.assert_allclose(res_p.oof_proba, res.oof_proba[perm])
    with pytest.raises(ValueError, match="do not match the split plan"):
        cross_validate_head(X[:-1], y[:-1], plan=plan, ids=ids[:-1], make_head=head)


# --------------------------------------------------------------------------- comparison


def test_equal_methods_are_not_measurably_different_and_the_cheaper_wins():
    y = NAMES[np.random.default_rng(0).integers(0, 2, 400)]
    classes = list(NAMES[:2])
    a = _noisy_proba(y, classes, accuracy=0.85, seed=1)
    b = _noisy_proba(y, classes, accuracy=0.85, seed=2)
    c = compare_methods(y, a, b, classes=classes, cost_a_seconds=3, cost_b_seconds=120)
    assert c.better is None and c.recommended == "Frozen"
    assert "Fine-tuned is not measurably better" in c.verdict and "40× faster: use it" in c.verdict
    assert c.difference.low < 0 < c.difference.high and c.p_value > 0.05
    assert not c.warnings
    json.dumps(c.to_dict(), allow_nan=False)


@pytest.mark.parametrize("k", [2, 3])
def test_clearly_better_method_is_called_better(k):
    classes = list(NAMES[:k])
    y = NAMES[np.random.default_rng(0).integers(0, k, 400)]
    a = _noisy_proba(y, classes, accuracy=0.75, seed=1)
    b = _noisy_proba(y, classes, accuracy=0.95, seed=2)
    c = compare_methods(y, a, b, classes=classes)
    assert c.better == "Fine-tuned" and c.recommended == "Fine-tuned" and c.p_value < 0.001
    assert c.verdict.startswith("Fine-tuned is better:") and "points more photos right" in c.verdict
    assert c.difference.low > 10
    rev = compare_methods(y, b, a, classes=classes, names=("Old", "New"))
    assert rev.better == "Old" and rev.verdict.startswith("Old is better")


def test_small_test_set_is_not_evidence():
    y = NAMES[np.random.default_rng(0).integers(0, 2, 23)]
    classes = list(NAMES[:2])
    c = compare_methods(
        y, _noisy_proba(y, classes, accuracy=0.7), _noisy_proba(y, classes, accuracy=0.9), classes=classes
    )
    assert "a test set of 23 photos is not evidence" in c.verdict.lower()


def test_align_proba():
    p = np.eye(3)
    np.testing.assert_array_equal(align_proba(p, ["a", "b", "c"], to=["c", "a", "b"]), p[[2, 0, 1]])
    with pytest.raises(ValueError, match="missing"):
        align_proba(p, ["a", "b", "c"], to=["a", "d"])


# --------------------------------------------------------------------------- label issues


@pytest.mark.parametrize("k", [2, 3])
def test_flipped_labels_rank_at_the_top(k):
    X, y, ids = _data(n=300, k=k, sep=2.0, seed=4)
    rng = np.random.default_rng(0)
    flipped = rng.choice(300, 10, replace=False)
    noisy = y.copy()
    classes = sorted(set(y))
    noisy[flipped] = [classes[(classes.index(v) + 1) % k] for v in y[flipped]]
    res = cross_validate_head(X, noisy, plan=plan_split(ids, noisy, n_repeats=1))
    issues = rank_label_issues(ids, noisy, res.oof_proba, classes=res.classes)
    assert len(issues) == 300 and issues["rank"].tolist() == list(range(1, 301))
    top = set(issues["id"].head(20))
    assert len(top & {ids[i] for i in flipped}) >= 8
    first = issues.iloc[0]
    assert first["suggested_label"] != first["given_label"] and first["likely_issue"]
    assert issues["self_confidence"].is_monotonic_increasing
    assert issues["likely_issue"].sum() < 40  # flags the doubtful few, not everything


def test_a_perfect_score_on_few_photos_still_has_an_honest_range():
    """32 of 32 right does not prove 100 %: the interval must reach well below it."""
    from core.comparison import compare_methods
    from core.evaluation import evaluate_predictions

    y = ["a"] * 16 + ["b"] * 16
    p = np.array([[1.0, 0.0]] * 16 + [[0.0, 1.0]] * 16)
    report = evaluate_predictions(y, p, classes=["a", "b"])
    assert report.accuracy.value == 1.0 and report.accuracy.low < 0.95
    big = evaluate_predictions(y * 50, np.vstack([p] * 50), classes=["a", "b"])
    assert big.accuracy.low > report.accuracy.low  # more photos, narrower range
    same = compare_methods(y, p, p, classes=["a", "b"])
    assert same.better is None and same.difference.low < -2 and same.difference.high > 2
