"""Frozen-backbone classifier heads: scikit-learn pipelines over cached CNN features.

The head is a plain :class:`~sklearn.pipeline.Pipeline` (``StandardScaler`` then a
multinomial logistic regression), so it composes with ``clone``, ``cross_val_predict``
and every other scikit-learn tool. The regularisation strength is chosen by an inner,
stratified cross-validation on log-loss unless a fixed ``C`` is given.

A fitted head is saved as a handful of numeric arrays (no pickle) with
:func:`head_to_arrays` and rebuilt with :func:`head_from_arrays`; ``predict_proba`` is
bit-for-bit identical after the round trip.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import cache

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import BaseCrossValidator, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = [
    "DEFAULT_CS",
    "AdaptiveStratifiedKFold",
    "LogisticHead",
    "LogisticHeadCV",
    "head_from_arrays",
    "head_to_arrays",
    "make_frozen_head",
    "single_threaded_blas",
]

# Candidate inverse regularisation strengths. With standardised 1000+-dimensional CNN
# codes and tens to thousands of photos the best C lies around 1e-4..1e-1 (it scales
# roughly like 1/n); the strong end costs almost nothing (2-3 L-BFGS iterations).
DEFAULT_CS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

# The names of the two pipeline steps; head_to_arrays/head_from_arrays rely on them.
SCALER_STEP = "scale"
CLASSIFIER_STEP = "logreg"


@cache
def _threadpool_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas():
    """Context manager: BLAS on one thread inside (OpenBLAS only, process-wide while open).

    Two measured reasons, on the 2-core machines this app targets:

    * L-BFGS on a ~1000-dimensional problem makes thousands of tiny BLAS calls that
      threads only slow down: a 500x1280 inner-CV fit takes 2.3 s with 2 threads and
      0.13 s with one; 5000x1280 with 10 classes 16.8 s -> 5.6 s.
    * When another process keeps a core busy (a feature-extraction job), every
      multi-threaded OpenBLAS call waits for a descheduled thread: a 300x128 PCA takes
      2.2 s instead of 3 ms.
    """
    return _threadpool_controller().limit(limits=1, user_api="blas")


class AdaptiveStratifiedKFold(BaseCrossValidator):
    """Stratified k-fold that lowers k when the smallest class has fewer than k photos.

    Inner cross-validation of a head trained on 40 photos with a class of 4 would
    otherwise fail; k never drops below 2.
    """

    def __init__(self, n_splits: int = 5, *, random_state: int | None = 0):
        self.n_splits = n_splits
        self.random_state = random_state

    def _effective_splits(self, y) -> int:
        if y is None:
            return self.n_splits
        _, counts = np.unique(np.asarray(y), return_counts=True)
        return int(max(2, min(self.n_splits, counts.min())))

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self._effective_splits(y)

    def split(self, X, y=None, groups=None):
        k = self._effective_splits(y)
        inner = StratifiedKFold(n_splits=k, shuffle=True, random_state=self.random_state)
        with warnings.catch_warnings():
            # A class with a single photo cannot be in every fold; sklearn warns, we accept.
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            folds = list(inner.split(X, y, groups))
        yield from folds

    def __repr__(self) -> str:
        return f"AdaptiveStratifiedKFold(n_splits={self.n_splits}, random_state={self.random_state})"


class LogisticHeadCV(LogisticRegressionCV):
    """``LogisticRegressionCV`` that fits and predicts with single-threaded BLAS (see :func:`single_threaded_blas`)."""

    def fit(self, X, y, sample_weight=None, **params):
        # scikit-learn 1.9's LogisticRegressionCV fails on class_weight="balanced" when the
        # labels are strings that look like numbers ("0"/"1", the commonest label sheet):
        # "The classes, [0, 1], are not in class_weight". Balanced sample weights are the
        # same weighting and avoid it.
        if self.class_weight == "balanced":
            from sklearn.utils.class_weight import compute_sample_weight

            balanced = compute_sample_weight("balanced", y)
            sample_weight = balanced if sample_weight is None else balanced * np.asarray(sample_weight)
            self.class_weight = None
            try:
                with single_threaded_blas():
                    return super().fit(X, y, sample_weight=sample_weight, **params)
            finally:
                self.class_weight = "balanced"
        with single_threaded_blas():
            return super().fit(X, y, sample_weight=sample_weight, **params)

    def decision_function(self, X):  # predict and predict_proba go through here
        with single_threaded_blas():
            return super().decision_function(X)


class LogisticHead(LogisticRegression):
    """``LogisticRegression`` that fits and predicts with single-threaded BLAS (see :func:`single_threaded_blas`)."""

    def fit(self, X, y, sample_weight=None):
        with single_threaded_blas():
            return super().fit(X, y, sample_weight=sample_weight)

    def decision_function(self, X):
        with single_threaded_blas():
            return super().decision_function(X)


def make_frozen_head(
    *,
    C: float | None = None,
    class_weight: str | None = "balanced",
    cv: int = 5,
    random_state: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 1000,
) -> Pipeline:
    """A standardise + logistic-regression pipeline for frozen CNN features.

    ``C=None`` picks the regularisation among ``Cs`` by stratified ``cv``-fold
    cross-validation on log-loss (good probabilities matter: they feed thresholds,
    confidence flags and label-issue ranking). ``class_weight="balanced"`` keeps a
    rare class from being ignored.
    """
    if C is not None and not C > 0:
        raise ValueError(f"C must be a positive number, got {C!r}.")
    if cv < 2:
        raise ValueError(f"cv must be at least 2, got {cv!r}.")
    if C is None:
        clf: LogisticRegression | LogisticRegressionCV = LogisticHeadCV(
            Cs=list(Cs),
            l1_ratios=(0.0,),
            cv=AdaptiveStratifiedKFold(cv, random_state=random_state),
            scoring="neg_log_loss",
            class_weight=class_weight,
            max_iter=max_iter,
            random_state=random_state,
            use_legacy_attributes=False,
        )
    else:
        clf = LogisticHead(C=float(C), class_weight=class_weight, max_iter=max_iter, random_state=random_state)
    return Pipeline([(SCALER_STEP, StandardScaler()), (CLASSIFIER_STEP, clf)])


def _chosen_C(clf) -> float:
    c = clf.C_ if hasattr(clf, "C_") else clf.C
    return float(np.ravel(c)[0])


def head_to_arrays(pipeline: Pipeline) -> dict[str, np.ndarray]:
    """The fitted head as plain numeric arrays, ready for safetensors.

    Class names are not numeric: store ``pipeline.classes_`` next to the arrays (the
    model bundle keeps them in its JSON) and pass them back to :func:`head_from_arrays`.
    """
    try:
        scaler = pipeline.named_steps[SCALER_STEP]
        clf = pipeline.named_steps[CLASSIFIER_STEP]
    except (AttributeError, KeyError) as exc:
        raise ValueError(
            f"Expected a pipeline made by make_frozen_head (steps {SCALER_STEP!r}, {CLASSIFIER_STEP!r}), got {pipeline!r}."
        ) from exc
    if not hasattr(clf, "coef_") or not hasattr(scaler, "scale_"):
        raise ValueError("The head is not fitted yet: fit it before saving.")
    return {
        "scaler.mean": np.ascontiguousarray(scaler.mean_),
        "scaler.scale": np.ascontiguousarray(scaler.scale_),
        "scaler.var": np.ascontiguousarray(scaler.var_),
        "logreg.coef": np.ascontiguousarray(clf.coef_),
        "logreg.intercept": np.ascontiguousarray(clf.intercept_),
        "logreg.C": np.asarray([_chosen_C(clf)], dtype=np.float64),
        "n_samples_seen": np.asarray([int(np.max(scaler.n_samples_seen_))], dtype=np.int64),
    }


HEAD_ARRAY_KEYS = frozenset(
    {"scaler.mean", "scaler.scale", "scaler.var", "logreg.coef", "logreg.intercept", "logreg.C", "n_samples_seen"}
)


def head_from_arrays(arrays: Mapping[str, np.ndarray], classes: Sequence[str]) -> Pipeline:
    """Rebuild a fitted head from :func:`head_to_arrays` output and its class names.

    Shapes are checked so that a damaged or foreign file fails here with a clear message
    rather than later inside ``predict_proba``.
    """
    missing = sorted(HEAD_ARRAY_KEYS - set(arrays))
    if missing:
        raise ValueError(f"The model file lacks the head arrays {missing}; it is damaged or not a frozen head.")
    classes_arr = np.asarray(list(classes))
    k = len(classes_arr)
    if k < 2 or len(set(classes_arr.tolist())) != k:
        raise ValueError(f"A head needs at least two distinct class names, got {list(classes_arr)!r}.")
    mean = np.asarray(arrays["scaler.mean"])
    scale = np.asarray(arrays["scaler.scale"])
    var = np.asarray(arrays["scaler.var"])
    coef = np.asarray(arrays["logreg.coef"])
    intercept = np.asarray(arrays["logreg.intercept"])
    d = mean.shape[0] if mean.ndim == 1 else -1
    rows = 1 if k == 2 else k
    if not (
        mean.ndim == 1
        and scale.shape == (d,)
        and var.shape == (d,)
        and coef.shape == (rows, d)
        and intercept.shape == (rows,)
    ):
        raise ValueError(
            "The head arrays do not fit together: "
            f"mean {mean.shape}, scale {scale.shape}, coef {coef.shape}, intercept {intercept.shape} "
            f"for {k} classes. The model file is damaged."
        )
    for name, a in (("mean", mean), ("scale", scale), ("coef", coef), ("intercept", intercept)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"The head's {name} contains NaN or infinite values; the model file is damaged.")

    scaler = StandardScaler()
    scaler.mean_ = mean
    scaler.scale_ = scale
    scaler.var_ = var
    scaler.n_features_in_ = d
    scaler.n_samples_seen_ = np.int64(np.asarray(arrays["n_samples_seen"]).ravel()[0])

    clf = LogisticHead(C=float(np.asarray(arrays["logreg.C"]).ravel()[0]))
    clf.coef_ = coef
    clf.intercept_ = intercept
    clf.classes_ = classes_arr
    clf.n_features_in_ = d
    clf.n_iter_ = np.zeros(1, dtype=np.int32)
    return Pipeline([(SCALER_STEP, scaler), (CLASSIFIER_STEP, clf)])
