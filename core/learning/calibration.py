"""Confidence that means what it says: calibration error, the reliability chart, and the fix.

Analysts read "92 % sure" literally, so the confidence a model states for the label it
gives must match how often that label is right. This module measures it and repairs it:

* :func:`reliability` groups photos by the confidence stated for the label given (ten
  equal bins) and compares it with how often that label was right; the **expected
  calibration error** (ECE, Guo et al. 2017) is the photo-weighted gap between the two.
* :func:`fit_calibration` learns a :class:`Calibration` from predictions the model made on
  photos it did not learn from (out-of-fold for the quick model, the validation photos for
  the fine-tuned network): the log-probabilities are divided by a temperature and, for two
  classes, shifted by a bias (Platt scaling on the log-odds). Both are monotone, so which
  photos get the tag does not change once the threshold is re-chosen on calibrated
  probabilities; only the confidence stated changes. For more than two classes only the
  temperature is used, which keeps the most probable class the most probable.
* It is kept only where it helps: in a two-fold cross-fit on the same predictions it must
  lower the log-loss of the half it did not see by more than two standard errors of the
  per-photo gain, otherwise :func:`fit_calibration` returns None.

A calibration travels inside the model bundle (:mod:`core.learning.bundles`) as two numbers
per model and is applied by :class:`core.learning.predictor.Predictor`, so an exported model
states the same confidence anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.learning.evaluation import positive_index, predict_labels

__all__ = [
    "N_BINS",
    "Calibration",
    "apply_calibration",
    "calibration_error",
    "fit_calibration",
    "reliability",
    "reliability_sentence",
]

N_BINS = 10
_EPS = 1e-7
_ROUGH_BELOW = 200  # held-out photos under which the reliability figures swing by several points
_MIN_PHOTOS = 20  # fewer predictions than this cannot tell a real miscalibration from noise


@dataclass(frozen=True)
class Calibration:
    """Temperature (and, for two classes, a bias on the positive class's log-odds) for probabilities."""

    temperature: float
    bias: float
    positive: int  # column the bias applies to (two classes); ignored otherwise
    fitted_on: str  # "cross-validation" | "validation photos": where its predictions came from
    n: int  # how many predictions it was fitted on

    def apply(self, proba) -> np.ndarray:
        p = np.asarray(proba, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] == 0:
            return p
        ok = ~np.isnan(p).any(axis=1)  # rows of unreadable photos stay NaN
        z = np.log(np.clip(p[ok], _EPS, 1.0)) / self.temperature
        if p.shape[1] == 2:
            z[:, self.positive] += self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out = p.copy()
        out[ok] = e / e.sum(axis=1, keepdims=True)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "temperature",
            "temperature": self.temperature,
            "bias": self.bias,
            "positive": self.positive,
            "fitted_on": self.fitted_on,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Read a stored calibration; ``ValueError`` when it is not one this app can apply."""
        try:
            if d.get("method") != "temperature":
                raise ValueError(f"unknown calibration method {d.get('method')!r}")
            t, b = float(d["temperature"]), float(d["bias"])
            out = cls(t, b, int(d["positive"]), str(d.get("fitted_on", "")), int(d.get("n", 0)))
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"the calibration is incomplete ({exc})") from exc
        if not (math.isfinite(t) and 0.01 <= t <= 100 and math.isfinite(b) and abs(b) <= 50 and out.positive in (0, 1)):
            raise ValueError(f"the calibration's numbers are out of range (temperature {t}, bias {b})")
        return out


def apply_calibration(proba, calibration: Mapping[str, Any] | Calibration | None) -> np.ndarray:
    """Calibrated probabilities (unchanged when there is no calibration)."""
    if calibration is None:
        return np.asarray(proba, dtype=np.float64)
    cal = calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
    return cal.apply(proba)


# --------------------------------------------------------------------------- measuring


def _stated(y_true, proba, classes: Sequence[str], positive: str | None, threshold: float | None):
    """Confidence stated for the label given (as the app shows it) and whether that label is right."""
    classes = [str(c) for c in classes]
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray([str(v) for v in y_true])
    if len(classes) != 2:
        positive, threshold = None, None
    given = predict_labels(p, classes=classes, positive=positive, threshold=threshold)
    index = {c: i for i, c in enumerate(classes)}
    conf = p[np.arange(len(p)), [index[str(g)] for g in given]]
    return conf, given == y


def reliability(
    y_true,
    proba,
    *,
    classes: Sequence[str],
    positive: str | None = None,
    threshold: float | None = None,
    n_bins: int = N_BINS,
) -> dict[str, Any]:
    """The reliability chart's data and the expected calibration error (ECE).

    Photos are grouped by the confidence stated for the label they are given (at
    ``threshold`` for two classes); each non-empty bin has ``low``, ``high``, ``n``, the mean
    ``confidence`` stated and the share ``right``. ``ece`` is the photo-weighted mean gap
    |confidence - right| (0 is perfect), ``n`` the number of photos.
    """
    conf, right = _stated(y_true, proba, classes, positive, threshold)
    return _binned(conf, right, n_bins)


def calibration_error(confidence, right, *, n_bins: int = N_BINS) -> float:
    """ECE of stated confidences (one per photo) given whether each label given was right."""
    return _binned(np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=bool), n_bins)["ece"]


def _binned(conf: np.ndarray, right: np.ndarray, n_bins: int) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        if not mask.any():
            continue
        c, r = float(conf[mask].mean()), float(right[mask].mean())
        ece += mask.sum() / max(1, len(conf)) * abs(c - r)
        bins.append(
            {"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(mask.sum()), "confidence": c, "right": r}
        )
    return {"bins": bins, "ece": float(ece), "n": int(len(conf))}


def reliability_sentence(rel: Mapping[str, Any], *, before: Mapping[str, Any] | None = None) -> str:
    """The reliability chart in plain words, e.g. 'When its confidence is 90 % or more, it is right 96 % of the time.'"""
    bins = [b for b in rel.get("bins", []) if b["n"] > 0]
    if not bins:
        return ""
    top = [b for b in bins if b["low"] >= 0.9 - 1e-9] or [bins[-1]]
    n = sum(b["n"] for b in top)
    said = sum(b["confidence"] * b["n"] for b in top) / n
    right = sum(b["right"] * b["n"] for b in top) / n
    gap = 100 * rel["ece"]
    text = (
        f"When its confidence is {100 * top[0]['low']:.0f} % or more ({n} of {rel['n']} held-out photos, "
        f"{100 * said:.0f} % on average), it is right {100 * right:.0f} % of the time. "
        f"On average its stated confidence is {gap:.1f} points away from how often it is right"
    )
    if before is not None and before.get("ece") is not None:
        text += f" ({100 * before['ece']:.1f} points before its confidence was adjusted)"
    text += "."
    if rel["n"] < _ROUGH_BELOW:
        text += f" On {rel['n']} photos these figures are rough: a few photos move them by several points."
    return text


# --------------------------------------------------------------------------- fitting


def _nll(z: np.ndarray, target: np.ndarray, log_t: float, bias: float, pos: int) -> float:
    return float(_losses(z, target, log_t, bias, pos).mean())


def _losses(z: np.ndarray, target: np.ndarray, log_t: float, bias: float, pos: int) -> np.ndarray:
    """Each photo's log-loss after scaling."""
    s = z / math.exp(log_t)
    if z.shape[1] == 2:
        s = s.copy()
        s[:, pos] += bias
    s = s - s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(z)), target]


def _fit(z: np.ndarray, target: np.ndarray, pos: int) -> tuple[float, float]:
    """Temperature and bias by log-loss, with a weak prior towards "no change" (log T and the
    bias near 0): on predictions that happen to be perfectly separated the plain log-loss
    would sharpen without limit, which no new photo bears out."""
    from scipy.optimize import minimize

    binary = z.shape[1] == 2
    start = np.array([0.0, 0.0]) if binary else np.array([0.0])
    bounds = [(math.log(0.2), math.log(20.0))] + ([(-5.0, 5.0)] if binary else [])
    n = len(z)

    def loss(v) -> float:
        bias = v[1] if binary else 0.0
        return _nll(z, target, v[0], bias, pos) + (v[0] ** 2 + bias**2 / 4) / (2 * n)

    res = minimize(loss, start, method="L-BFGS-B", bounds=bounds)
    return float(math.exp(res.x[0])), float(res.x[1]) if binary else 0.0


def fit_calibration(
    y_true,
    proba,
    *,
    classes: Sequence[str],
    positive: str | None = None,
    fitted_on: str = "cross-validation",
    seed: int = 0,
) -> Calibration | None:
    """Learn a calibration from predictions on photos the model did not learn from; None
    when there are too few of them or a two-fold cross-fit shows it does not help."""
    classes = [str(c) for c in classes]
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray([str(v) for v in y_true])
    keep = ~np.isnan(p).any(axis=1)
    p, y = p[keep], y[keep]
    index = {c: i for i, c in enumerate(classes)}
    if len(y) < _MIN_PHOTOS or any(v not in index for v in y):
        return None
    target = np.array([index[v] for v in y])
    counts = np.bincount(target, minlength=len(classes))
    if (counts[counts > 0] < 2).any() or (counts > 0).sum() < 2:
        return None
    pos = positive_index(classes, positive) if len(classes) == 2 else 1
    z = np.log(np.clip(p, _EPS, 1.0))

    from sklearn.model_selection import StratifiedKFold

    gains: list[np.ndarray] = []
    present = counts > 0
    folds = (
        StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(z, target)
        if present.sum() > 1 and counts[present].min() >= 2
        else []
    )
    for fit_idx, held_idx in folds:
        t, b = _fit(z[fit_idx], target[fit_idx], pos)
        gains.append(
            _losses(z[held_idx], target[held_idx], 0.0, 0.0, pos)
            - _losses(z[held_idx], target[held_idx], math.log(t), b, pos)
        )
    # it must lower the log-loss of photos it did not see by more than chance would (two standard errors)
    gain = np.concatenate(gains) if gains else np.zeros(0)
    if len(gain) < 2 or not gain.mean() > 2 * gain.std(ddof=1) / math.sqrt(len(gain)):
        return None
    t, b = _fit(z, target, pos)
    return Calibration(temperature=t, bias=b, positive=pos, fitted_on=fitted_on, n=int(len(y)))
