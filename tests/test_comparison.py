"""Comparing two methods on the same photos, and ranking likely label mistakes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.learning.comparison import align_proba, compare_methods, rank_label_issues
from core.learning.crossval import cross_validate_head
from core.learning.splits import plan_split
from tests.evaluation_data import NAMES, features, noisy_proba


def test_equal_methods_are_not_measurably_different_and_the_cheaper_wins():
    y = NAMES[np.random.default_rng(0).integers(0, 2, 400)]
    classes = list(NAMES[:2])
    a = noisy_proba(y, classes, accuracy=0.85, seed=1)
    b = noisy_proba(y, classes, accuracy=0.85, seed=2)
    c = compare_methods(y, a, b, classes=classes, cost_a_seconds=3, cost_b_seconds=120)
    assert c.better is None and c.recommended == "Frozen"
    assert "Fine-tuned is not measurably better" in c.verdict
    # what the user waited for, in time, not a ratio of fit times ("609× faster" before)
    assert "Frozen took 3 s to train, Fine-tuned 2 min: use Frozen." in c.verdict and "×" not in c.verdict
    assert "95 % range \u2212" in c.verdict and " points" in c.verdict  # the range is written as everywhere
    assert c.difference.low < 0 < c.difference.high and c.p_value > 0.05
    assert not c.warnings
    json.dumps(c.to_dict(), allow_nan=False)


@pytest.mark.parametrize("k", [2, 3])
def test_clearly_better_method_is_called_better(k):
    classes = list(NAMES[:k])
    y = NAMES[np.random.default_rng(0).integers(0, k, 400)]
    a = noisy_proba(y, classes, accuracy=0.75, seed=1)
    b = noisy_proba(y, classes, accuracy=0.95, seed=2)
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
        y, noisy_proba(y, classes, accuracy=0.7), noisy_proba(y, classes, accuracy=0.9), classes=classes
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
    X, y, ids = features(n=300, k=k, sep=2.0, seed=4)
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


def test_durations_read_as_people_say_them():
    from core.base.durations import duration_text

    assert [duration_text(s) for s in (0.4, 28, 349, 725, 3900)] == [
        "under 1 s",
        "28 s",
        "5 min 49 s",
        "12 min",
        "1 h 5 min",
    ]
    assert [duration_text(s, rough=True) for s in (2, 28, 421, 1321)] == ["5 s", "30 s", "7 min", "22 min"]
