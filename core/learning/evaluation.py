"""Honest evaluation: reports with uncertainty, thresholds, cross-validation of frozen heads.

The rules this module enforces (the split itself is :mod:`core.learning.splits`; cross-validation
of a frozen head is :mod:`core.learning.crossval`; comparing two methods and ranking label
issues is :mod:`core.learning.comparison`):

* Every method is scored on the held-out test photos of the project's one split plan,
  which nothing else ever looks at.
* Small data (under the plan's ``small_data_threshold`` photos) gets repeated stratified
  k-fold cross-validation of the frozen head on the training part, with an interval that
  is corrected for the overlap between folds (Nadeau & Bengio, 2003).
* Every headline number carries a 95 % bootstrap interval, and the text says when a
  test set is too small to be evidence.

Probabilities are ``(n, n_classes)`` arrays whose columns follow ``classes``; for two
classes the ``positive`` class (default: the second) is the one a threshold applies to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "Estimate",
    "EvalReport",
    "choose_threshold",
    "evaluate_predictions",
    "predict_labels",
    "range_text",
]

MIN_TEST_PHOTOS = 50  # below this a test set is "not evidence" (DESIGN.md)
MAX_CURVE_POINTS = 1001  # ROC/PR curves are thinned to this many points for storage


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class Estimate:
    """A number with its 95 % interval (``low``/``high`` are ``None`` when unknown)."""

    value: float
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        return cls(float(d["value"]), _opt_float(d.get("low")), _opt_float(d.get("high")))


def range_text(low: float | None, high: float | None, *, points: bool = False) -> str:
    """The one way every 95 % range is written, e.g. ``"95 % range 66.7 to 100.0 %"``.

    ``low``/``high`` are shares (0 to 1) shown as percentages, or with ``points=True``
    differences in percentage points, shown signed (``"95 % range −3.3 to +6.7 points"``).
    Empty when the range is unknown.
    """
    if low is None or high is None:
        return ""
    if points:
        lo, hi = (f"{v:+.1f}".replace("-", "\u2212") for v in (low, high))
        return f"95 % range {lo} to {hi} points"
    return f"95 % range {100 * low:.1f} to {100 * high:.1f} %"


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _check_proba(proba, classes: Sequence[str]) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(
            f"Expected probabilities of shape (n, {len(classes)}) for classes {list(classes)}, got {p.shape}."
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("The probabilities contain NaN or infinite values.")
    return p


def positive_index(classes: Sequence[str], positive: str | None) -> int:
    if positive is None:
        return 1
    if positive not in classes:
        raise ValueError(f"The positive class {positive!r} is not one of {list(classes)}.")
    return list(classes).index(positive)


def predict_labels(
    proba, *, classes: Sequence[str], positive: str | None = None, threshold: float | None = None
) -> np.ndarray:
    """Labels from probabilities: the threshold on the positive class for two classes,
    the most probable class otherwise. Every method must predict through this function."""
    classes = [str(c) for c in classes]
    p = _check_proba(proba, classes)
    if len(classes) == 2:
        pi = positive_index(classes, positive)
        t = 0.5 if threshold is None else float(threshold)
        return np.where(p[:, pi] >= t, classes[pi], classes[1 - pi])
    if threshold is not None:
        raise ValueError("A threshold only applies to two-class models.")
    return np.asarray(classes)[np.argmax(p, axis=1)]


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(y_true.tolist()) - set(index))
    if unknown:
        raise ValueError(f"Labels {unknown} are not among the classes {list(classes)}.")
    t = np.fromiter((index[v] for v in y_true), dtype=np.int64, count=len(y_true))
    p = np.fromiter((index[v] for v in y_pred), dtype=np.int64, count=len(y_pred))
    k = len(classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def scores_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Accuracy, balanced accuracy and macro F1 from confusion matrices ``(..., k, k)``.

    Same definitions as scikit-learn's defaults: balanced accuracy averages recall over
    classes present in the truth; macro F1 averages over classes present in truth or
    prediction.
    """
    cm = np.asarray(cm, dtype=np.float64)
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    rows, cols = cm.sum(axis=-1), cm.sum(axis=-2)
    n = rows.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = diag.sum(axis=-1) / n
        present = rows > 0
        bal = np.where(present, diag / np.where(present, rows, 1), 0).sum(axis=-1) / present.sum(axis=-1)
        seen = (rows + cols) > 0
        f1 = np.where(seen, 2 * diag / np.where(seen, rows + cols, 1), 0).sum(axis=-1) / seen.sum(axis=-1)
    return np.stack([acc, bal, f1], axis=-1)


METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}


def _bootstrap_scores(cm: np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    # Resampling photos with replacement is the same as drawing the confusion-matrix
    # cells from a multinomial with the observed cell frequencies: O(n_boot * k^2), not
    # O(n_boot * n), so 50,000 photos cost the same as 50.
    # The cell frequencies are drawn from their Jeffreys posterior (Dirichlet(counts + ½))
    # rather than fixed at the observed ones: with a perfect score on 32 photos a plain
    # bootstrap says "100 to 100 %", which overstates what 32 photos can show.
    n = int(cm.sum())
    rng = np.random.default_rng(seed)
    cells = rng.dirichlet(cm.ravel().astype(np.float64) + 0.5, size=n_boot)
    draws = rng.multinomial(n, cells)
    return scores_from_confusion(draws.reshape(n_boot, *cm.shape))


def _thin(*curves: np.ndarray) -> list[list[float]]:
    n = len(curves[0])
    idx = (
        np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(int)) if n > MAX_CURVE_POINTS else np.arange(n)
    )
    return [np.asarray(c, dtype=np.float64)[idx].tolist() for c in curves]


@dataclass
class EvalReport:
    """Scores of one method on one set of photos."""

    n: int
    classes: list[str]
    accuracy: Estimate
    balanced_accuracy: Estimate
    macro_f1: Estimate
    report: pd.DataFrame  # rows: classes + "macro avg" + "weighted avg"; precision, recall, f1, support
    confusion: np.ndarray  # counts, rows = true class, columns = predicted class, in ``classes`` order
    positive: str | None = None
    threshold: float | None = None
    roc_auc: float | None = None
    average_precision: float | None = None
    roc: dict[str, list[float]] | None = None  # fpr, tpr, thresholds
    pr: dict[str, list[float]] | None = None  # precision, recall, thresholds
    warnings: list[str] = field(default_factory=list)
    n_boot: int = 1000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        rep = self.report
        return {
            "n": self.n,
            "classes": list(self.classes),
            "accuracy": self.accuracy.to_dict(),
            "balanced_accuracy": self.balanced_accuracy.to_dict(),
            "macro_f1": self.macro_f1.to_dict(),
            "report": {
                "index": [str(i) for i in rep.index],
                "columns": [str(c) for c in rep.columns],
                "data": [[float(v) for v in row] for row in rep.to_numpy()],
            },
            "confusion": self.confusion.astype(int).tolist(),
            "positive": self.positive,
            "threshold": self.threshold,
            "roc_auc": self.roc_auc,
            "average_precision": self.average_precision,
            "roc": self.roc,
            "pr": self.pr,
            "warnings": list(self.warnings),
            "n_boot": self.n_boot,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalReport:
        try:
            rep = d["report"]
            report = pd.DataFrame(rep["data"], index=rep["index"], columns=rep["columns"])
            if "support" in report:
                report["support"] = report["support"].astype(int)
            return cls(
                n=int(d["n"]),
                classes=[str(c) for c in d["classes"]],
                accuracy=Estimate.from_dict(d["accuracy"]),
                balanced_accuracy=Estimate.from_dict(d["balanced_accuracy"]),
                macro_f1=Estimate.from_dict(d["macro_f1"]),
                report=report,
                confusion=np.asarray(d["confusion"], dtype=np.int64),
                positive=d.get("positive"),
                threshold=_opt_float(d.get("threshold")),
                roc_auc=_opt_float(d.get("roc_auc")),
                average_precision=_opt_float(d.get("average_precision")),
                roc=d.get("roc"),
                pr=d.get("pr"),
                warnings=[str(w) for w in d.get("warnings", [])],
                n_boot=int(d.get("n_boot", 1000)),
                seed=int(d.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"The evaluation report is incomplete or malformed: {exc}.") from exc


def _report_frame(cm: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    diag = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(diag / predicted)
        recall = np.nan_to_num(diag / support)
        f1 = np.nan_to_num(2 * diag / (support + predicted))
    df = pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "support": support}, index=list(classes))
    w = support / max(1, support.sum())
    df.loc["macro avg"] = [precision.mean(), recall.mean(), f1.mean(), support.sum()]
    df.loc["weighted avg"] = [precision @ w, recall @ w, f1 @ w, support.sum()]
    df["support"] = df["support"].astype(int)
    return df


def evaluate_predictions(
    y_true: Sequence[str],
    proba,
    *,
    classes: Sequence[str],
    positive: str | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> EvalReport:
    """Score predicted probabilities against the true labels, with 95 % bootstrap intervals.

    For two classes, ``threshold`` (default 0.5) applies to the ``positive`` class
    (default ``classes[1]``) and ROC/PR curves are added; it must have been chosen
    without these photos (see :func:`choose_threshold`).
    """
    classes = [str(c) for c in classes]
    y = np.asarray([str(v) for v in y_true])
    p = _check_proba(proba, classes)
    if len(y) != len(p):
        raise ValueError(f"Got {len(y)} labels but {len(p)} rows of probabilities.")
    if len(y) == 0:
        raise ValueError("There are no photos to evaluate.")
    binary = len(classes) == 2
    if binary:
        pos_i = positive_index(classes, positive)
        positive, threshold = classes[pos_i], 0.5 if threshold is None else float(threshold)
    y_pred = predict_labels(p, classes=classes, positive=positive, threshold=threshold)
    cm = confusion_counts(y, y_pred, classes)
    point = scores_from_confusion(cm)
    boot = _bootstrap_scores(cm, n_boot=n_boot, seed=seed) if n_boot > 0 else None
    estimates = {}
    for j, name in enumerate(METRICS):
        if boot is None:
            estimates[name] = Estimate(float(point[j]))
        else:
            lo, hi = np.nanpercentile(boot[:, j], [2.5, 97.5])
            estimates[name] = Estimate(float(point[j]), float(lo), float(hi))

    report = EvalReport(
        n=len(y),
        classes=classes,
        report=_report_frame(cm, classes),
        confusion=cm,
        n_boot=n_boot,
        seed=seed,
        **estimates,
    )
    if binary:
        report.positive, report.threshold = positive, threshold
        is_pos = y == positive
        score = p[:, pos_i]
        if 0 < is_pos.sum() < len(y):
            fpr, tpr, thr = roc_curve(is_pos, score)
            prec, rec, pthr = precision_recall_curve(is_pos, score, drop_intermediate=True)
            fpr, tpr, thr = _thin(fpr, tpr, np.clip(thr, 0.0, 1.0))
            prec, rec, pthr = _thin(prec[:-1], rec[:-1], pthr)  # the last point (recall 0) has no threshold
            report.roc = {"fpr": fpr, "tpr": tpr, "thresholds": thr}
            report.pr = {"precision": prec, "recall": rec, "thresholds": pthr}
            report.roc_auc = float(roc_auc_score(is_pos, score))
            report.average_precision = float(average_precision_score(is_pos, score))
    report.warnings = _small_sample_warnings(report)
    return report


def _small_sample_warnings(report: EvalReport) -> list[str]:
    out = []
    acc = report.balanced_accuracy  # the headline figure, so the warning quotes the range shown beside it
    if report.n < MIN_TEST_PHOTOS:
        swing = "" if acc.low is None else f" (balanced accuracy {range_text(acc.low, acc.high)})"
        out.append(
            f"A test set of {report.n} photos is not evidence{swing}: label more photos, "
            f"at least {MIN_TEST_PHOTOS} for testing, before trusting these numbers."
        )
    support = report.report["support"].iloc[: len(report.classes)]
    few = [f"'{c}' ({int(s)})" for c, s in support.items() if s < 5]
    if few:
        out.append("Very few test photos for " + ", ".join(few) + ": the scores for these labels are guesses.")
    return out


# --------------------------------------------------------------------------- thresholds


def choose_threshold(y_true, proba_pos, *, rule: str = "balanced", positive: str | None = None) -> float:
    """The decision threshold on the positive class's probability, from photos NOT in the test set.

    ``y_true`` is boolean (is positive) or labels with ``positive`` naming the positive
    one. Rules: ``"balanced"`` maximises balanced accuracy (identical to Youden's J,
    alias ``"youden"``), ``"f1"`` maximises the positive class's F1, ``"default"`` is
    0.5. Thresholds fall midway between observed probabilities; ties go to the one
    nearest 0.5.
    """
    y = np.asarray(y_true)
    if positive is not None:
        y = np.asarray([str(v) for v in y]) == str(positive)
    elif y.dtype.kind not in "bui":
        raise ValueError("choose_threshold needs boolean labels, or positive= to say which label is positive.")
    y = y.astype(bool)
    s = np.asarray(proba_pos, dtype=np.float64).ravel()
    if len(s) != len(y):
        raise ValueError(f"Got {len(y)} labels but {len(s)} probabilities.")
    if rule not in ("balanced", "youden", "f1", "default"):
        raise ValueError(f"Unknown threshold rule {rule!r}; use 'balanced', 'youden', 'f1' or 'default'.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if rule == "default" or n_pos == 0 or n_neg == 0:
        return 0.5
    u = np.unique(s)
    cand = np.unique(np.concatenate([(u[:-1] + u[1:]) / 2, [0.5]]))
    tp = n_pos - np.searchsorted(np.sort(s[y]), cand, side="left")
    fp = n_neg - np.searchsorted(np.sort(s[~y]), cand, side="left")
    if rule == "f1":
        gain = 2 * tp / np.maximum(1, 2 * tp + fp + (n_pos - tp))
    else:
        gain = tp / n_pos - fp / n_neg
    best = np.flatnonzero(gain >= gain.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])
