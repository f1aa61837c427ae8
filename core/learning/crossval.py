"""Cross-validation of a frozen head on the cached features, and its held-out test score.

Small data (under the plan's ``small_data_threshold`` photos) gets repeated stratified
k-fold cross-validation on the training part of the project's split plan, with an interval
corrected for the overlap between folds (Nadeau & Bengio, 2003); the final head, fit on
all training photos, is scored once on the held-out test photos (:mod:`core.learning.evaluation`).
Its confidence is calibrated on the out-of-fold predictions where that helps
(:mod:`core.learning.calibration`); the threshold and the test scores are then on the
calibrated probabilities, and the reliability on the test photos is measured before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone

from core.learning.calibration import apply_calibration, fit_calibration, reliability
from core.learning.evaluation import (
    METRIC_NAMES,
    METRICS,
    EvalReport,
    choose_threshold,
    confusion_counts,
    evaluate_predictions,
    positive_index,
    predict_labels,
    range_text,
    scores_from_confusion,
)
from core.learning.heads import make_frozen_head, single_threaded_blas
from core.learning.splits import SplitPlan

__all__ = ["CVResult", "cross_validate_head"]


@dataclass
class CVResult:
    """Cross-validation of a frozen head plus its score on the held-out test photos.

    ``oof_proba[i]`` is a probability for ``ids[i]`` from a head that never saw that
    photo: the mean over cross-validation repeats for training photos, the final head
    (fit on the whole training part) for test photos (``in_test``).
    """

    classes: list[str]
    ids: list[str]
    oof_proba: np.ndarray
    in_test: np.ndarray
    fold_scores: pd.DataFrame
    summary: dict[str, dict[str, float | None]]  # metric -> mean, std, low, high (empty without CV)
    positive: str | None
    threshold: float | None
    test_ids: list[str]
    test_proba: np.ndarray
    test_report: EvalReport
    model: Any  # the head fitted on the whole training part: the one to ship
    fit_seconds: float
    cv_seconds: float
    n_splits: int
    n_repeats: int
    calibration: dict[str, Any] | None = None  # Calibration.to_dict(), None: the raw probabilities are kept
    raw_test_proba: np.ndarray | None = None  # the test photos' probabilities before calibration...
    raw_threshold: float | None = None  # ...and the threshold chosen on the uncalibrated out-of-fold ones
    reliability: dict[str, Any] | None = None  # {"before": ..., "after": ...} on the test photos

    def headline(self, metric: str = "balanced_accuracy") -> str:
        """One sentence for the UI, e.g. 'Balanced accuracy 91.2 % (95 % range 88.0 to 94.3 %) ...'."""
        s = self.summary.get(metric)
        name = METRIC_NAMES[metric].capitalize()
        if not s:
            e = getattr(self.test_report, metric)
            return f"{name} {100 * e.value:.1f} % on {self.test_report.n} test photos ({range_text(e.low, e.high)})."
        rng = "" if s["low"] is None else f" ({range_text(s['low'], s['high'])})"
        return f"{name} {100 * s['mean']:.1f} %{rng}, from {self.n_repeats}× repeated {self.n_splits}-fold cross-validation."

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the per-photo probabilities and the fitted model)."""
        return {
            "classes": list(self.classes),
            "positive": self.positive,
            "threshold": self.threshold,
            "n_splits": self.n_splits,
            "n_repeats": self.n_repeats,
            "summary": self.summary,
            "fold_scores": self.fold_scores.to_dict(orient="records"),
            "test_report": self.test_report.to_dict(),
            "fit_seconds": self.fit_seconds,
            "cv_seconds": self.cv_seconds,
            "calibration": self.calibration,
            "reliability": self.reliability,
        }


def _aligned_proba(model, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    # A fold's training part can lack a rare class; its column is then zero.
    p = model.predict_proba(X)
    out = np.zeros((len(X), len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, c in enumerate(model.classes_):
        out[:, index[str(c)]] = p[:, j]
    return out


def _fit_predict(make_head, X_fit, y_fit, X_score, classes) -> tuple[Any, np.ndarray]:
    with single_threaded_blas():  # any head, not only ours: see core.learning.heads.single_threaded_blas
        model = clone(make_head()).fit(X_fit, y_fit)
        return model, _aligned_proba(model, X_score, classes)


def _corrected_interval(scores: np.ndarray, n_splits: int) -> tuple[float | None, float | None]:
    # Folds share training photos, so their scores are correlated and the naive
    # standard error is too small; Nadeau & Bengio's correction adds n_test/n_train.
    from scipy.stats import t as student_t

    j = len(scores)
    if j < 2:
        return None, None
    se = math.sqrt((1 / j + 1 / (n_splits - 1)) * np.var(scores, ddof=1))
    h = float(student_t.ppf(0.975, j - 1)) * se
    m = float(np.mean(scores))
    return max(0.0, m - h), min(1.0, m + h)


def _rows_for(plan: SplitPlan, ids: Sequence[str] | None, n_rows: int) -> tuple[list[str], np.ndarray]:
    """Row of X for each position in ``plan.ids``."""
    if ids is None:
        if n_rows != len(plan.ids):
            raise ValueError(f"X has {n_rows} rows but the split plan has {len(plan.ids)} photos; pass ids=.")
        return list(plan.ids), np.arange(n_rows)
    ids = [str(i) for i in ids]
    if len(ids) != n_rows:
        raise ValueError(f"Got {len(ids)} ids for {n_rows} rows of features.")
    row = {i: r for r, i in enumerate(ids)}
    missing = [i for i in plan.ids if i not in row]
    extra = len(ids) - (len(plan.ids) - len(missing))
    if missing or extra:
        raise ValueError(
            f"The photos do not match the split plan ({len(missing)} planned photos missing, {extra} unplanned); "
            "make a new plan after adding or removing photos."
        )
    return ids, np.array([row[i] for i in plan.ids])


def cross_validate_head(
    X,
    y: Sequence[str],
    *,
    plan: SplitPlan,
    ids: Sequence[str] | None = None,
    make_head: Callable[[], Any] = make_frozen_head,
    positive: str | None = None,
    threshold_rule: str = "balanced",
    n_boot: int = 1000,
    calibrate: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> CVResult:
    """Cross-validate a frozen head on the plan's training part, then score it on the test photos.

    Rows of ``X``/``y`` follow ``ids`` (default: ``plan.ids``). Fold scores use the
    default decision rule (0.5 / most probable class); for two classes the reported
    threshold is chosen by ``threshold_rule`` on the out-of-fold probabilities of the
    training part and applied to the test photos.
    """
    X = np.asarray(X)
    y = np.asarray([str(v) for v in y])
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape} and {len(y)} labels.")
    row_ids, rows = _rows_for(plan, ids, len(X))
    Xp, yp = X[rows], y[rows]  # in plan.ids order from here on
    classes = sorted(set(yp.tolist()))
    test_set = set(plan.test_ids)
    is_test = np.array([i in test_set for i in plan.ids])
    train_pos, test_pos = np.flatnonzero(~is_test), np.flatnonzero(is_test)

    splits = list(plan.cv_splits())
    total, done = len(splits) + 1, 0
    oof_sum = np.zeros((len(plan.ids), len(classes)))
    oof_first = np.zeros((len(plan.ids), len(classes)))  # repeat 0: one model's prediction per photo
    records = []
    t0 = time.perf_counter()
    for r, k, fit_pos, score_pos in splits:
        _, p = _fit_predict(make_head, Xp[fit_pos], yp[fit_pos], Xp[score_pos], classes)
        oof_sum[score_pos] += p
        if r == 0:
            oof_first[score_pos] = p
        cm = confusion_counts(yp[score_pos], predict_labels(p, classes=classes, positive=positive), classes)
        records.append(
            {"repeat": r, "fold": k, "n_fit": len(fit_pos), "n_scored": len(score_pos)}
            | dict(zip(METRICS, map(float, scores_from_confusion(cm)), strict=True))
        )
        done += 1
        if on_progress:
            on_progress(done, total)
    cv_seconds = time.perf_counter() - t0
    fold_scores = pd.DataFrame.from_records(records, columns=["repeat", "fold", "n_fit", "n_scored", *METRICS])

    summary: dict[str, dict[str, float | None]] = {}
    if records:
        for m in METRICS:
            s = fold_scores[m].to_numpy()
            lo, hi = _corrected_interval(s, plan.n_splits)
            summary[m] = {
                "mean": float(s.mean()),
                "std": float(s.std(ddof=1)) if len(s) > 1 else 0.0,
                "low": lo,
                "high": hi,
            }

    binary = len(classes) == 2
    if binary:
        positive = classes[positive_index(classes, positive)]
    calibration = None
    if records and calibrate:
        calibration = fit_calibration(yp[train_pos], oof_first[train_pos], classes=classes,
                                      positive=positive if binary else None, fitted_on="cross-validation",
                                      seed=plan.seed)
    threshold = raw_threshold = None
    if binary:
        threshold = raw_threshold = 0.5
        if records:
            oof_train = oof_sum[train_pos] / max(1, plan.n_repeats)
            pick = lambda p: choose_threshold(  # noqa: E731
                yp[train_pos], p[:, classes.index(positive)], rule=threshold_rule, positive=positive)
            raw_threshold = pick(oof_train)
            threshold = pick(apply_calibration(oof_train, calibration)) if calibration else raw_threshold

    t1 = time.perf_counter()
    final, raw_test_proba = _fit_predict(make_head, Xp[train_pos], yp[train_pos], Xp[test_pos], classes)
    fit_seconds = time.perf_counter() - t1
    test_proba = apply_calibration(raw_test_proba, calibration)
    rel = {"before": reliability(yp[test_pos], raw_test_proba, classes=classes, positive=positive if binary else None,
                                 threshold=raw_threshold),
           "after": reliability(yp[test_pos], test_proba, classes=classes, positive=positive if binary else None,
                                threshold=threshold)}
    test_report = evaluate_predictions(
        yp[test_pos],
        test_proba,
        classes=classes,
        positive=positive if binary else None,
        threshold=threshold,
        n_boot=n_boot,
        seed=plan.seed,
    )
    if on_progress:
        on_progress(total, total)

    oof = apply_calibration(oof_sum / max(1, plan.n_repeats), calibration)
    if not records:  # no CV planned: only test photos get honest probabilities
        oof[train_pos] = np.nan
    oof[test_pos] = test_proba
    # back to the caller's row order
    back = np.empty(len(rows), dtype=int)
    back[rows] = np.arange(len(rows))
    return CVResult(
        classes=classes,
        ids=row_ids,
        oof_proba=oof[back],
        in_test=is_test[back],
        fold_scores=fold_scores,
        summary=summary,
        positive=positive if binary else None,
        threshold=threshold,
        test_ids=[plan.ids[i] for i in test_pos],
        test_proba=test_proba,
        test_report=test_report,
        model=final,
        fit_seconds=fit_seconds,
        cv_seconds=cv_seconds,
        n_splits=plan.n_splits,
        n_repeats=plan.n_repeats,
        calibration=calibration.to_dict() if calibration else None,
        reliability=rel,
        raw_test_proba=raw_test_proba,
        raw_threshold=raw_threshold,
    )


