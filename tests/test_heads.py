"""Frozen heads: the scikit-learn contract, real learning, and the pickle-free round trip."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import Pipeline

from core.learning.heads import AdaptiveStratifiedKFold, head_from_arrays, head_to_arrays, make_frozen_head

NAMES = np.array(["no person", "person", "pet"])


def _data(n=240, d=40, k=2, seed=0, sep=1.5):
    X, y = make_classification(
        n, d, n_informative=8, n_redundant=4, n_classes=k, n_clusters_per_class=1, class_sep=sep, random_state=seed
    )
    return X.astype(np.float32), NAMES[y]


def _holdout_accuracy(model, X, y):
    model.fit(X[::2], y[::2])
    return float((model.predict(X[1::2]) == y[1::2]).mean())


@pytest.mark.parametrize("k", [2, 3])
def test_learns_separable_data_and_not_shuffled_labels(k):
    X, y = _data(k=k)
    assert _holdout_accuracy(make_frozen_head(), X, y) > 0.85
    shuffled = np.random.default_rng(1).permutation(y)
    chance = 1 / k
    assert abs(_holdout_accuracy(make_frozen_head(), X, shuffled) - chance) < 0.15


def test_is_a_real_pipeline_that_clones_and_cross_validates():
    X, y = _data(k=3)
    head = make_frozen_head(cv=3)
    assert isinstance(head, Pipeline)
    twin = clone(head)
    assert twin.get_params()["logreg__cv"].n_splits == 3
    proba = cross_val_predict(twin, X, y, cv=3, method="predict_proba")
    assert proba.shape == (len(y), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_fixed_C_skips_inner_cv_and_rejects_nonsense():
    X, y = _data()
    head = make_frozen_head(C=0.01).fit(X, y)
    assert head.named_steps["logreg"].C == 0.01
    with pytest.raises(ValueError, match="C must be"):
        make_frozen_head(C=0)


def test_inner_cv_chooses_among_the_grid():
    X, y = _data()
    head = make_frozen_head(Cs=[1e-3, 1e-1]).fit(X, y)
    assert float(np.ravel(head.named_steps["logreg"].C_)[0]) in (1e-3, 1e-1)


def test_tiny_class_lowers_inner_folds_instead_of_failing():
    X, y = _data(n=40)
    y = y.copy()
    y[:3] = "pet"  # 3 photos: 5-fold stratification is impossible
    head = make_frozen_head().fit(X, y)
    assert list(head.classes_) == ["no person", "person", "pet"]
    assert AdaptiveStratifiedKFold(5).get_n_splits(y=y) == 3


@pytest.mark.parametrize("k", [2, 3])
def test_array_round_trip_gives_identical_probabilities(k):
    X, y = _data(k=k)
    head = make_frozen_head().fit(X, y)
    arrays = head_to_arrays(head)
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays.values())
    restored = head_from_arrays(arrays, head.classes_)
    np.testing.assert_array_equal(restored.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(restored.predict(X), head.predict(X))


def test_restoring_rejects_mismatched_arrays():
    X, y = _data(k=3)
    arrays = head_to_arrays(make_frozen_head(C=1.0).fit(X, y))
    with pytest.raises(ValueError, match="do not fit together"):
        head_from_arrays(arrays, ["a", "b"])  # 3-class coefficients, 2 names
    del arrays["logreg.coef"]
    with pytest.raises(ValueError, match="lacks"):
        head_from_arrays(arrays, NAMES)
    with pytest.raises(ValueError, match="not fitted"):
        head_to_arrays(make_frozen_head())


def test_numeric_looking_string_labels_train_like_any_other():
    """Label sheets most often say 0/1; scikit-learn 1.9 tripped on "0"/"1" with balanced weights."""
    from sklearn.datasets import make_classification

    X, y = make_classification(200, 20, weights=[0.75], random_state=0)
    words = make_frozen_head().fit(X, np.array(["no", "yes"])[y]).predict_proba(X)
    digits = make_frozen_head().fit(X, np.array(["0", "1"])[y]).predict_proba(X)
    np.testing.assert_allclose(words, digits)
