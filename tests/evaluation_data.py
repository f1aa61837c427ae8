"""Synthetic features and probabilities shared by the evaluation, split and comparison tests."""

from __future__ import annotations

import json

import numpy as np
from sklearn.datasets import make_classification

NAMES = np.array(["no person", "person", "pet"])


def features(n=200, k=2, seed=0, sep=1.5, weights=None):
    X, y = make_classification(
        n, 20, n_informative=6, n_classes=k, n_clusters_per_class=1, class_sep=sep, weights=weights, random_state=seed
    )
    return X.astype(np.float32), NAMES[y], [f"{seed}-{i:05d}" for i in range(n)]


def json_round_trip(d):
    return json.loads(json.dumps(d, allow_nan=False))


def noisy_proba(y, classes, *, accuracy, seed=0):
    """Probabilities that pick the true class with the given accuracy."""
    rng = np.random.default_rng(seed)
    idx = np.searchsorted(classes, y)
    wrong = rng.random(len(y)) >= accuracy
    pick = np.where(wrong, (idx + rng.integers(1, len(classes), len(y))) % len(classes), idx)
    p = np.full((len(y), len(classes)), 0.1 / max(1, len(classes) - 1))
    p[np.arange(len(y)), pick] = 0.9
    return p


# --------------------------------------------------------------------------- split plans
