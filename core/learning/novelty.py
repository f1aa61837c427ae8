"""Photos unlike anything a model learned from: the "none of these" a classifier cannot say.

A classifier always answers with one of its classes, and often sure of itself: a mountain
bike shown to a model of birds and dogs comes out "bird" at 93 %. What it cannot hide is
that the bike's features sit far from every training photo. :class:`Novelty` keeps the
training photos' backbone features (unit length, at most :data:`MAX_REFERENCE` of them)
and measures a new photo's cosine distance to its k-th nearest training photo (k-NN
distance, as in Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"). The limit is calibrated on held-out photos, which the model never saw but
which are like its training photos: a photo farther than :data:`PERCENTILE` % of them is
flagged for review with the reason :data:`REASON`.

It is stored inside the model bundle, as arrays of its ``head.safetensors`` (keys
``novelty.*``; a head ignores keys it does not know), so an exported or imported model
keeps it; a model saved before this existed simply has none. Both kinds of model use the
backbone's pretrained features (those of ``weights_hash``): a fine-tuned model is judged
against the same features its training photos had before fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_REFERENCE", "PERCENTILE", "REASON", "Novelty", "fit_novelty"]

REASON = "unlike the training photos"
PERCENTILE = 95.0  # a held-out photo like the training ones is flagged about 1 time in 20
MAX_REFERENCE = 5000  # training photos kept (float16): 5,000 x 1,280 features is 12.8 MB
K = 3
MIN_HELD_OUT = 20  # fewer held-out photos than this: the training photos' own distances join them
_KEYS = ("novelty.reference", "novelty.threshold", "novelty.k")


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Novelty:
    """The training photos' unit features, the k of k-NN and the calibrated distance limit."""

    reference: np.ndarray
    threshold: float
    k: int

    def distances(self, X: np.ndarray, *, leave_out_self: bool = False) -> np.ndarray:
        """Cosine distance of each row of ``X`` to its k-th nearest training photo."""
        X = _unit(X)
        if len(X) == 0:
            return np.empty(0)
        ref = self.reference.astype(np.float32)
        k = min(self.k + int(leave_out_self), len(ref))
        out = np.empty(len(X))
        for start in range(0, len(X), 1024):  # bounded memory for big catalogs
            sim = X[start : start + 1024] @ ref.T
            kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
            out[start : start + 1024] = 1.0 - kth
        return out

    def unlike(self, X: np.ndarray) -> np.ndarray:
        """True for each photo farther from the training photos than the calibrated limit."""
        return self.distances(X) > self.threshold

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "novelty.reference": self.reference.astype(np.float16),
            "novelty.threshold": np.asarray([self.threshold], dtype=np.float32),
            "novelty.k": np.asarray([self.k], dtype=np.int32),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, n_features: int | None = None) -> Novelty | None:
        """The novelty part of a bundle's arrays, or None when it has none or it does not fit."""
        if not all(key in arrays for key in _KEYS):
            return None
        reference = np.asarray(arrays["novelty.reference"])
        threshold, k = np.asarray(arrays["novelty.threshold"]).ravel(), np.asarray(arrays["novelty.k"]).ravel()
        if (
            reference.ndim != 2
            or len(reference) == 0
            or threshold.size != 1
            or k.size != 1
            or not np.isfinite(threshold[0])
            or int(k[0]) < 1
            or (n_features is not None and reference.shape[1] != n_features)
        ):
            return None
        return cls(reference=reference, threshold=float(threshold[0]), k=int(k[0]))

    def summary(self, held_out: np.ndarray | None = None) -> dict:
        """What the model file says about it (bundle metrics): plain numbers for an audit."""
        out = {
            "method": f"cosine distance to the {self.k}-th nearest training photo",
            "percentile": PERCENTILE,
            "threshold": round(self.threshold, 4),
            "reference_photos": len(self.reference),
        }
        if held_out is not None and len(held_out):
            out["held_out_flagged"] = int(self.unlike(held_out).sum())
            out["held_out"] = len(held_out)
        return out


def fit_novelty(X_train: np.ndarray, X_held_out: np.ndarray | None = None, *, k: int = K, seed: int = 0) -> Novelty:
    """Keep the training features and calibrate the limit on the held-out photos' distances
    (with fewer than :data:`MIN_HELD_OUT` of them, each training photo's distance to the other
    training photos counts too: 5 held-out photos alone would put the limit at their maximum)."""
    X_train = _unit(X_train)
    if len(X_train) > MAX_REFERENCE:
        X_train = X_train[np.sort(np.random.default_rng(seed).choice(len(X_train), MAX_REFERENCE, replace=False))]
    k = max(1, min(k, len(X_train) - 1))
    reference = X_train.astype(np.float16)
    probe = Novelty(reference=reference, threshold=np.inf, k=k)
    calibration = probe.distances(X_held_out) if X_held_out is not None else np.empty(0)
    if len(calibration) < MIN_HELD_OUT:  # too few to trust: each training photo's distance to the others too
        calibration = np.concatenate([calibration, probe.distances(X_train, leave_out_self=True)])
    # "higher": the limit is a distance one of them had, so at least 95 % of them are within it.
    return Novelty(reference=reference, threshold=float(np.percentile(calibration, PERCENTILE, method="higher")), k=k)
