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

A photo can also sit near training photos of the wrong class: a shirt on a hanger, laid
among studio shots where shirts were always worn, is near the "person" photos' shirts in
general and is called "person", but it is far from every photo that taught the model
"person". So when the training photos' classes are known, a photo is also measured against
the training photos of the class it was called (class-conditional k-NN, as the
class-conditional Gaussians of Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples"), with a limit calibrated the same way on that class's
held-out photos. Measured by ``benchmarks/bench_novelty.py`` (Lite0, the quick model trained
on the shared catalog photos, 4 split seeds): of the flat-lay phone photos it calls "person"
(5 to 8 of 300), the first check alone left 3 to 5 unflagged, the two together none; held-out
catalog photos flagged went from 4 to 6 of 96.

It is stored inside the model bundle, as arrays of its ``head.safetensors`` (keys
``novelty.*``; a head ignores keys it does not know; the class-conditional part is
``novelty.labels`` and ``novelty.class_threshold``), so an exported or imported model
keeps it; a model saved before this existed simply has none. Both kinds of model use the
backbone's pretrained features (those of ``weights_hash``): a fine-tuned model is judged
against the same features its training photos had before fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASS_KEYS", "MAX_REFERENCE", "PERCENTILE", "REASON", "Novelty", "fit_novelty"]

REASON = "unlike the training photos"
PERCENTILE = 95.0  # a held-out photo like the training ones is flagged about 1 time in 20
MAX_REFERENCE = 5000  # training photos kept (float16): 5,000 x 1,280 features is 12.8 MB
K = 3
# A photo this close to a limit counts as within it. The limit is a distance one calibration photo
# had (method "higher"), and that photo's features, computed again in another process, with other
# threads or another batch, differ in the 7th digit: without this margin it is flagged or not by
# chance (a Ray worker flagged it, the single machine did not). Real differences are far larger:
# in that case the next photo was 3.3e-3 inside the limit.
MARGIN = 1e-4
MIN_HELD_OUT = 20  # fewer held-out photos than this: the training photos' own distances join them
_KEYS = ("novelty.reference", "novelty.threshold", "novelty.k")
CLASS_KEYS = ("novelty.labels", "novelty.class_threshold")  # optional: models before them have none


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _kth_distance(sim: np.ndarray, k: int) -> np.ndarray:
    """1 - the k-th largest cosine similarity of each row (k clipped to the columns there are)."""
    k = min(k, sim.shape[1])
    return 1.0 - -np.partition(-sim, k - 1, axis=1)[:, k - 1]


@dataclass(frozen=True)
class Novelty:
    """The training photos' unit features, the k of k-NN and the calibrated distance limit; with
    ``labels`` (each training photo's class, an index into the model's classes) and
    ``class_thresholds`` (one limit per class, NaN where it has too few photos to measure), the
    class-conditional check too."""

    reference: np.ndarray
    threshold: float
    k: int
    labels: np.ndarray | None = None
    class_thresholds: np.ndarray | None = None

    def distances(self, X: np.ndarray, *, leave_out_self: bool = False, within: int | None = None) -> np.ndarray:
        """Cosine distance of each row of ``X`` to its k-th nearest training photo (of class
        ``within`` only, when given)."""
        X = _unit(X)
        if len(X) == 0:
            return np.empty(0)
        ref = self.reference.astype(np.float32)
        if within is not None:
            ref = ref[self.labels == within]
        k = self.k + int(leave_out_self)
        out = np.empty(len(X))
        for start in range(0, len(X), 1024):  # bounded memory for big catalogs
            out[start : start + 1024] = _kth_distance(X[start : start + 1024] @ ref.T, k)
        return out

    def unlike(self, X: np.ndarray, predicted: np.ndarray | None = None) -> np.ndarray:
        """True for each photo farther from the training photos than the calibrated limit, or,
        given the class each photo was called (``predicted``: indices into the model's classes,
        -1 for none), farther from that class's training photos than that class's limit."""
        flags = self.distances(X) > self.threshold + MARGIN
        if predicted is None or self.labels is None or self.class_thresholds is None:
            return flags
        predicted = np.asarray(predicted)
        for c, limit in enumerate(self.class_thresholds):
            rows = np.flatnonzero(predicted == c)
            if len(rows) and np.isfinite(limit):
                flags[rows] |= self.distances(np.asarray(X)[rows], within=c) > limit + MARGIN
        return flags

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "novelty.reference": self.reference.astype(np.float16),
            "novelty.threshold": np.asarray([self.threshold], dtype=np.float32),
            "novelty.k": np.asarray([self.k], dtype=np.int32),
        }
        if self.labels is not None and self.class_thresholds is not None:
            out["novelty.labels"] = self.labels.astype(np.int32)
            out["novelty.class_threshold"] = self.class_thresholds.astype(np.float32)
        return out

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
        labels = class_thresholds = None
        if all(key in arrays for key in CLASS_KEYS):  # kept only when they fit the reference
            labels = np.asarray(arrays["novelty.labels"]).ravel().astype(np.int64)
            class_thresholds = np.asarray(arrays["novelty.class_threshold"], dtype=np.float64).ravel()
            if len(labels) != len(reference) or labels.min() < -1 or labels.max() >= len(class_thresholds):
                labels = class_thresholds = None
        return cls(reference=reference, threshold=float(threshold[0]), k=int(k[0]), labels=labels,
                   class_thresholds=class_thresholds)

    def summary(self, held_out: np.ndarray | None = None) -> dict:
        """What the model file says about it (bundle metrics): plain numbers for an audit."""
        out = {
            "method": f"cosine distance to the {self.k}-th nearest training photo"
            + (", and to the k-th nearest of the class it was called" if self.class_thresholds is not None else ""),
            "percentile": PERCENTILE,
            "threshold": round(self.threshold, 4),
            "reference_photos": len(self.reference),
        }
        if self.class_thresholds is not None:
            out["class_thresholds"] = [None if not np.isfinite(t) else round(float(t), 4) for t in self.class_thresholds]
        if held_out is not None and len(held_out):
            out["held_out_flagged"] = int(self.unlike(held_out).sum())
            out["held_out"] = len(held_out)
        return out


def _limit(probe: Novelty, held_out: np.ndarray, training: np.ndarray, within: int | None = None) -> float:
    """The distance at the :data:`PERCENTILE` of the held-out photos' (with fewer than
    :data:`MIN_HELD_OUT` of them, the training photos' distances to the others join them)."""
    calibration = probe.distances(held_out, within=within) if len(held_out) else np.empty(0)
    if len(calibration) < MIN_HELD_OUT:  # too few to trust: each training photo's distance to the others too
        calibration = np.concatenate([calibration, probe.distances(training, leave_out_self=True, within=within)])
    # "higher": the limit is a distance one of them had, so at least 95 % of them are within it.
    return float(np.percentile(calibration, PERCENTILE, method="higher"))


def fit_novelty(X_train: np.ndarray, X_held_out: np.ndarray | None = None, *, k: int = K, seed: int = 0,
                y_train=None, y_held_out=None, classes=None) -> Novelty:
    """Keep the training features and calibrate the limit on the held-out photos' distances
    (with fewer than :data:`MIN_HELD_OUT` of them, each training photo's distance to the other
    training photos counts too: 5 held-out photos alone would put the limit at their maximum).
    With the photos' labels and the model's ``classes``, each class gets its own limit the same
    way, on its own photos (none, NaN, for a class with at most k training photos)."""
    X_train = _unit(X_train)
    X_held_out = np.empty((0, X_train.shape[1]), dtype=np.float32) if X_held_out is None else _unit(X_held_out)
    labelled = y_train is not None and classes is not None
    labels = held_labels = None
    if labelled:
        index = {str(c): i for i, c in enumerate(classes)}
        labels = np.asarray([index.get(str(v), -1) for v in y_train])
        held_labels = (np.asarray([index.get(str(v), -1) for v in y_held_out]) if y_held_out is not None
                       else np.full(len(X_held_out), -1))  # held-out photos of no known class
    if len(X_train) > MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(len(X_train), MAX_REFERENCE, replace=False))
        X_train = X_train[keep]
        if labelled:
            labels = labels[keep]
    k = max(1, min(k, len(X_train) - 1))
    reference = X_train.astype(np.float16)
    probe = Novelty(reference=reference, threshold=np.inf, k=k, labels=labels)
    threshold = _limit(probe, X_held_out, X_train)
    if not labelled:
        return Novelty(reference=reference, threshold=threshold, k=k)
    limits = np.full(len(classes), np.nan)
    for c in range(len(classes)):
        if (labels == c).sum() > k:
            limits[c] = _limit(probe, X_held_out[held_labels == c], X_train[labels == c], within=c)
    return Novelty(reference=reference, threshold=threshold, k=k, labels=labels, class_thresholds=limits)
