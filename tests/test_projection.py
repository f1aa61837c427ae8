"""2-D maps: shape, determinism, and structure that survives the projection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from core.learning.projection import project_2d, warm_up_umap


@pytest.fixture(scope="module")
def blobs():
    # Non-negative, like pooled ReLU features, and wider than the PCA step.
    X, y = make_blobs(300, 128, centers=3, cluster_std=4.0, random_state=0)
    return np.abs(X).astype(np.float32), y


@pytest.fixture(scope="module", autouse=True)
def _warm():
    warm_up_umap()  # pays numba's compilation once for the whole module
    warm_up_umap()  # a second call is free


@pytest.mark.parametrize("method", ["umap", "pca"])
def test_shape_dtype_and_determinism(blobs, method):
    X, _ = blobs
    Z = project_2d(X, method=method, seed=1)
    assert Z.shape == (300, 2) and Z.dtype == np.float32 and np.all(np.isfinite(Z))
    np.testing.assert_array_equal(project_2d(X, method=method, seed=1), Z)


@pytest.mark.parametrize("method", ["umap", "pca"])
def test_separated_blobs_stay_separated(blobs, method):
    X, y = blobs
    Z = project_2d(X, method=method)
    assert silhouette_score(Z, y) > 0.5
    assert cross_val_score(KNeighborsClassifier(5), Z, y, cv=5).mean() > 0.95


def test_structureless_data_gives_no_clusters():
    X = np.abs(np.random.default_rng(0).normal(size=(200, 64))).astype(np.float32)
    fake = np.random.default_rng(1).integers(0, 3, 200)
    assert abs(silhouette_score(project_2d(X), fake)) < 0.1


@pytest.mark.parametrize("n", [0, 1, 2, 4, 7, 12])
def test_tiny_projects_still_get_a_map(n):
    X = np.abs(np.random.default_rng(n).normal(size=(n, 32))).astype(np.float32)
    Z = project_2d(X, n_neighbors=15)
    assert Z.shape == (n, 2) and np.all(np.isfinite(Z))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="Unknown projection"):
        project_2d(np.zeros((5, 3)), method="tsne")
    with pytest.raises(ValueError, match="NaN"):
        project_2d(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="shape"):
        project_2d(np.zeros(5))
