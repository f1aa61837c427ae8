"""2-D maps of CNN features for the Explore page (UMAP, with PCA as the fast fallback).

The first UMAP fit in a process pays ~7 s of numba compilation whatever the data size
(STACK.md); call :func:`warm_up_umap` once per server process, in the background,
so that no analyst waits for it.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from core.learning.heads import single_threaded_blas

__all__ = ["METHODS", "project_2d", "warm_up_umap"]

METHODS = ("umap", "pca")
PCA_DIMS = 50  # UMAP runs on the first 50 principal components of wide features


def _prepare(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"Expected a feature matrix of shape (n, d), got {X.shape}.")
    if not np.all(np.isfinite(X)):
        raise ValueError("The features contain NaN or infinite values; extract them again.")
    # Centring removes the direction all pooled CNN codes share (they are non-negative),
    # so cosine distance then compares what differs between photos.
    return X - X.mean(axis=0, dtype=np.float64).astype(np.float32)


def _pca(Xc: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    k = max(1, min(n_components, Xc.shape[0], Xc.shape[1]))
    Z = PCA(n_components=k, random_state=seed).fit_transform(Xc)
    # PCA axis signs are arbitrary between library versions: fix them for stable maps.
    signs = np.sign(Z[np.argmax(np.abs(Z), axis=0), np.arange(k)])
    return (Z * np.where(signs == 0, 1, signs)).astype(np.float32)


def _pad2(Z: np.ndarray) -> np.ndarray:
    out = np.zeros((Z.shape[0], 2), dtype=np.float32)
    out[:, : min(2, Z.shape[1])] = Z[:, :2]
    return out


def _knn(Z: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    # Exact neighbours by brute force (chunked BLAS, seconds even for 50,000 photos)
    # instead of UMAP's pynndescent, whose own numba compilation costs ~25 s more per
    # process above 4,096 photos. UMAP expects each point as its own first neighbour.
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(Z).kneighbors(Z)
    return idx.astype(np.int32), np.maximum(dist, 0).astype(np.float32)


def project_2d(
    X,
    *,
    method: str = "umap",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
) -> np.ndarray:
    """An ``(n, 2)`` float32 map of the photos: near points are photos the network sees alike.

    UMAP on the centred features (reduced to 50 principal components when wider) with
    cosine distance; ``method="pca"`` gives the first two principal components in a
    fraction of a second. The same data and seed give the same map. ``n_neighbors``
    is lowered for tiny projects; under 5 photos the map is PCA.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown projection method {method!r}; choose one of {METHODS}.")
    with single_threaded_blas():
        return _project(X, method=method, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric)


def _project(X, *, method: str, seed: int, n_neighbors: int, min_dist: float, metric: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 2 and X.shape[0] < 2:
        return np.zeros((X.shape[0], 2), dtype=np.float32)
    Xc = _prepare(X)
    n = Xc.shape[0]
    if method == "pca" or n < 5:
        return _pad2(_pca(Xc, 2, seed))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ImportWarning)  # "Tensorflow not installed": not needed
        import umap

    Z = _pca(Xc, PCA_DIMS, seed) if Xc.shape[1] > PCA_DIMS else Xc
    k = int(max(2, min(n_neighbors, n - 1)))
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        min_dist=min_dist,
        metric=metric,
        random_state=seed,
        n_jobs=1,  # a fixed random_state forces one thread anyway; saying so avoids a warning
        init="spectral" if n > 10 else "random",  # spectral init fails on tiny graphs
        precomputed_knn=_knn(Z, k, metric),
    )
    with warnings.catch_warnings():
        # Disconnected components and tiny graphs make UMAP warn about its init; the map is still fine.
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        return np.ascontiguousarray(reducer.fit_transform(Z), dtype=np.float32)


_warm_lock = threading.Lock()
_warm = False


def warm_up_umap() -> None:
    """Pay UMAP's one-off numba compilation now (about 7 s on 2 cores), once per process.

    Safe to call from several threads; later calls return at once.
    """
    global _warm
    with _warm_lock:
        if _warm:
            return
        rng = np.random.default_rng(0)
        project_2d(rng.normal(size=(64, 8)).astype(np.float32), seed=0, n_neighbors=5)
        _warm = True
