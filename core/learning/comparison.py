"""Comparing two methods on the same held-out photos, and ranking likely label mistakes.

:func:`compare_methods` answers "is fine-tuning measurably better than the frozen head?"
with an exact McNemar test and a paired bootstrap that must agree, and words the answer
as a verdict; :func:`rank_label_issues` lists the photos whose given label the
out-of-fold predictions find hardest to believe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.base.durations import duration_text
from core.learning.evaluation import MIN_TEST_PHOTOS, Estimate, predict_labels, range_text

__all__ = ["Comparison", "align_proba", "compare_methods", "rank_label_issues"]

def align_proba(proba, ids: Sequence[str], *, to: Sequence[str]) -> np.ndarray:
    """Reorder per-photo probabilities given for ``ids`` into the order of ``to``.

    Use it before :func:`compare_methods` when two methods list the test photos in a
    different order; a photo missing from either side is an error, not a silent drop.
    """
    p = np.asarray(proba)
    pos = {str(i): r for r, i in enumerate(ids)}
    missing = [i for i in to if str(i) not in pos]
    if missing or len(ids) != len(p):
        raise ValueError(f"Predictions are missing for {len(missing)} of the {len(to)} photos (e.g. {missing[:3]}).")
    return p[[pos[str(i)] for i in to]]


@dataclass
class Comparison:
    """A paired comparison of two methods on the same photos, with a plain-English verdict."""

    names: tuple[str, str]
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: Estimate  # accuracy of B minus A, in percentage points
    only_a_right: int
    only_b_right: int
    p_value: float  # exact McNemar test
    better: str | None  # the name of the measurably better method, else None
    recommended: str
    verdict: str
    warnings: list[str] = field(default_factory=list)
    cost_a_seconds: float | None = None
    cost_b_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "n": self.n,
            "accuracy_a": self.accuracy_a,
            "accuracy_b": self.accuracy_b,
            "difference": self.difference.to_dict(),
            "only_a_right": self.only_a_right,
            "only_b_right": self.only_b_right,
            "p_value": self.p_value,
            "better": self.better,
            "recommended": self.recommended,
            "verdict": self.verdict,
            "warnings": list(self.warnings),
            "cost_a_seconds": self.cost_a_seconds,
            "cost_b_seconds": self.cost_b_seconds,
        }


def _pts(v: float) -> str:
    return f"{v:+.1f}".replace("-", "\u2212")


def compare_methods(
    y_true: Sequence[str],
    proba_a,
    proba_b,
    *,
    classes: Sequence[str],
    names: tuple[str, str] = ("Frozen", "Fine-tuned"),
    positive: str | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    cost_a_seconds: float | None = None,
    cost_b_seconds: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Is method B (e.g. fine-tuning) measurably better than method A on the same photos?

    Rows of both probability arrays must be the same photos in the same order (see
    :func:`align_proba`). "Better" needs both the exact McNemar test (p < ``alpha``)
    and the paired-bootstrap 95 % range of the accuracy difference to agree. When the
    two are not measurably different, the cheaper one (``cost_*_seconds``: how long the
    user waited for each training job, start to finish), else A, is recommended.
    """
    from scipy.stats import binomtest

    classes = [str(c) for c in classes]
    y = np.asarray([str(v) for v in y_true])
    a_ok = predict_labels(proba_a, classes=classes, positive=positive, threshold=threshold_a) == y
    b_ok = predict_labels(proba_b, classes=classes, positive=positive, threshold=threshold_b) == y
    if not (len(y) == len(a_ok) == len(b_ok)) or len(y) == 0:
        raise ValueError(
            f"Both methods need predictions for the same photos: {len(y)} labels, {len(a_ok)} and {len(b_ok)} predictions."
        )
    n = len(y)
    only_a, only_b = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    p_value = float(binomtest(only_b, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    diff = 100 * (only_b - only_a) / n
    # Paired bootstrap over the three kinds of photo (only A right / same / only B right),
    # with the Jeffreys posterior for their shares so that 0 disagreements on a few photos
    # does not read as "no uncertainty" (see _bootstrap_scores).
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([only_a + 0.5, n - only_a - only_b + 0.5, only_b + 0.5], size=n_boot)
    draws = rng.multinomial(n, shares)
    lo, hi = np.percentile(100 * (draws[:, 2] - draws[:, 0]) / n, [2.5, 97.5])
    name_a, name_b = names

    better = None
    if p_value < alpha and lo > 0:
        better = name_b
    elif p_value < alpha and hi < 0:
        better = name_a
    rng = range_text(lo, hi, points=True)
    costs = cost_a_seconds is not None and cost_b_seconds is not None and min(cost_a_seconds, cost_b_seconds) > 0
    if better == name_b:
        verdict = f"{name_b} is better: {diff:.1f} points more photos right ({rng}). Use {name_b}."
        if costs and cost_b_seconds > 1.2 * cost_a_seconds:
            verdict += f" It took {duration_text(cost_b_seconds)} to train, {name_a} {duration_text(cost_a_seconds)}."
    elif better == name_a:
        verdict = (
            f"{name_a} is better: {-diff:.1f} points more photos right than {name_b} "
            f"({range_text(-hi, -lo, points=True)}). Use {name_a}."
        )
    else:
        verdict = f"{name_b} is not measurably better than {name_a} here ({_pts(diff)} points, {rng})."
    if better is None:
        recommended = name_a
        if costs:
            ratio = max(cost_a_seconds, cost_b_seconds) / min(cost_a_seconds, cost_b_seconds)
            # the simpler one, unless the other was clearly quicker to wait for
            recommended = name_b if ratio >= 1.2 and cost_b_seconds < cost_a_seconds else name_a
            verdict += (
                f" {name_a} took {duration_text(cost_a_seconds)} to train, {name_b} {duration_text(cost_b_seconds)}: "
                f"use {recommended}."
                if ratio >= 1.2
                else f" Both train about as fast: use {recommended}."
            )
        else:
            verdict += f" Use {name_a}, the simpler one."
    else:
        recommended = better

    warnings = []
    if n < MIN_TEST_PHOTOS:
        warnings.append(
            f"A test set of {n} photos is not evidence: luck alone can move the difference "
            f"by about \u00b1{(hi - lo) / 2:.0f} points. "
            f"Label more photos (at least {MIN_TEST_PHOTOS} for testing, 100+ is better) before choosing."
        )
        verdict += " " + warnings[-1]
    return Comparison(
        names=(name_a, name_b),
        n=n,
        accuracy_a=float(a_ok.mean()),
        accuracy_b=float(b_ok.mean()),
        difference=Estimate(float(diff), float(lo), float(hi)),
        only_a_right=only_a,
        only_b_right=only_b,
        p_value=p_value,
        better=better,
        recommended=recommended,
        verdict=verdict,
        warnings=warnings,
        cost_a_seconds=cost_a_seconds,
        cost_b_seconds=cost_b_seconds,
    )


# --------------------------------------------------------------------------- label issues


def rank_label_issues(ids: Sequence[str], y: Sequence[str], oof_proba, *, classes: Sequence[str]) -> pd.DataFrame:
    """Photos whose given label looks wrong, most suspicious first.

    Needs out-of-fold probabilities (a model that saw a photo's label would just echo it).
    Ranks by self-confidence, the probability of the given label; ``likely_issue`` marks
    photos that confident learning (Northcutt et al., 2021) counts as mislabelled: some
    other class reaches its per-class threshold (the mean probability of that class over
    photos labelled with it). Rows without probabilities (NaN) are left out.
    """
    classes = [str(c) for c in classes]
    ids = [str(i) for i in ids]
    labels = np.asarray([str(v) for v in y])
    p = np.asarray(oof_proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(ids), len(classes)) or len(labels) != len(ids):
        raise ValueError(
            f"Expected {len(ids)} labels and probabilities of shape ({len(ids)}, {len(classes)}), got {len(labels)} and {p.shape}."
        )
    keep = np.all(np.isfinite(p), axis=1)
    ids_k, labels_k, p = [i for i, k in zip(ids, keep, strict=True) if k], labels[keep], p[keep]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels_k.tolist()) - set(index))
    if unknown:
        raise ValueError(f"Labels {unknown} are not among the classes {classes}.")
    given = np.array([index[v] for v in labels_k], dtype=int)
    rows = np.arange(len(given))
    self_conf = p[rows, given]

    thresholds = np.array([p[given == j, j].mean() if np.any(given == j) else np.inf for j in range(len(classes))])
    above = p >= thresholds
    confident = np.where(above.any(axis=1), np.argmax(np.where(above, p, -1.0), axis=1), -1)
    likely = (confident >= 0) & (confident != given)
    suggested = np.argmax(p, axis=1)

    df = pd.DataFrame(
        {
            "id": ids_k,
            "given_label": labels_k,
            "suggested_label": np.asarray(classes)[suggested],
            "self_confidence": self_conf,
            "suggested_confidence": p[rows, suggested],
            "likely_issue": likely,
        }
    )
    df = df.sort_values(["self_confidence", "id"], kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df
