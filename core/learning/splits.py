"""The split plan: which labelled photos train, tune and test every method of a project.

One :class:`SplitPlan` per project. Its held-out test photos are scored by every method
(frozen head, fine-tuned network) and used for nothing else: no threshold, no
regularisation and no early stopping ever looks at them. Small data (under
``small_data_threshold`` photos) also gets the repeated stratified k-fold folds that
:func:`core.learning.evaluation.cross_validate_head` uses on the training part.

Given groups (several shots of one product, near-duplicates: :mod:`core.learning.groups`),
every part is drawn by group: a group is wholly in the test, validation or training
photos and wholly in one cross-validation fold (``StratifiedGroupKFold``), so no method is
tested on a photo whose twin it learned from.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold

from core.base.problems import InputError

__all__ = ["PLAN_VERSION", "SplitPlan", "plan_split"]

PLAN_VERSION = 2  # 2: groups kept together (version 1 plans are read as per-photo plans)

@dataclass
class SplitPlan:
    """Which photo plays which role, fixed once per project and shared by all methods.

    ``train_ids`` + ``val_ids`` form the training part. A fine-tuned network trains on
    ``train_ids`` and early-stops on ``val_ids``; the frozen head (which needs no early
    stopping) trains on the whole training part. ``test_ids`` are only ever scored.
    ``cv_folds[r][i]`` is the cross-validation fold of ``ids[i]`` in repeat ``r``
    (``-1`` for test photos); it is empty when no cross-validation is planned.
    """

    ids: list[str]
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    cv_folds: list[list[int]]
    n_splits: int
    n_repeats: int
    seed: int
    test_size: float
    val_size: float
    small_data_threshold: int
    groups: list[int] = field(default_factory=list)  # group of ``ids[i]``; empty: every photo on its own
    group_source: str = ""  # "column" | "near_duplicates" | "" (what the groups are)
    version: int = PLAN_VERSION

    @property
    def kept_together(self) -> bool:
        """Whether groups of several photos exist and each sits on one side of every split."""
        return bool(self.groups) and len(set(self.groups)) < len(self.ids)

    @property
    def training_ids(self) -> list[str]:
        """The training part (train + validation), in ``ids`` order."""
        test = set(self.test_ids)
        return [i for i in self.ids if i not in test]

    @property
    def small_data(self) -> bool:
        return len(self.ids) < self.small_data_threshold

    def cv_splits(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(repeat, fold, fit_positions, score_positions)`` with positions into ``ids``."""
        for r, folds in enumerate(self.cv_folds):
            f = np.asarray(folds)
            for k in range(self.n_splits):
                yield r, k, np.flatnonzero((f >= 0) & (f != k)), np.flatnonzero(f == k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "seed": self.seed,
            "test_size": self.test_size,
            "val_size": self.val_size,
            "small_data_threshold": self.small_data_threshold,
            "n_splits": self.n_splits,
            "n_repeats": self.n_repeats,
            "ids": list(self.ids),
            "train_ids": list(self.train_ids),
            "val_ids": list(self.val_ids),
            "test_ids": list(self.test_ids),
            "cv_folds": [list(map(int, f)) for f in self.cv_folds],
            "groups": [int(g) for g in self.groups],
            "group_source": self.group_source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitPlan:
        """Rebuild and check a plan read from JSON; raises ``ValueError`` if it is inconsistent."""
        if not isinstance(d, Mapping) or d.get("version") not in (1, PLAN_VERSION):
            raise ValueError(f"Not a split plan of version {PLAN_VERSION}: {str(d)[:80]!r}.")
        try:
            plan = cls(
                ids=[str(i) for i in d["ids"]],
                train_ids=[str(i) for i in d["train_ids"]],
                val_ids=[str(i) for i in d["val_ids"]],
                test_ids=[str(i) for i in d["test_ids"]],
                cv_folds=[[int(v) for v in f] for f in d["cv_folds"]],
                n_splits=int(d["n_splits"]),
                n_repeats=int(d["n_repeats"]),
                seed=int(d["seed"]),
                test_size=float(d["test_size"]),
                val_size=float(d["val_size"]),
                small_data_threshold=int(d["small_data_threshold"]),
                groups=[int(g) for g in d.get("groups", [])],
                group_source=str(d.get("group_source", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"The split plan is incomplete or malformed: {exc}.") from exc
        parts = plan.train_ids + plan.val_ids + plan.test_ids
        if len(set(plan.ids)) != len(plan.ids) or sorted(parts) != sorted(plan.ids):
            raise ValueError("The split plan is inconsistent: train, validation and test do not partition its photos.")
        if len(plan.cv_folds) != plan.n_repeats or any(len(f) != len(plan.ids) for f in plan.cv_folds):
            raise ValueError("The split plan is inconsistent: its cross-validation folds do not match its photos.")
        if plan.groups and (len(plan.groups) != len(plan.ids) or _straddling(plan)):
            raise ValueError("The split plan is inconsistent: a group of photos sits on both sides of a split.")
        return plan


def _allocate(counts: np.ndarray, fraction: float, *, keep: int) -> np.ndarray:
    """Per-class sizes that sum to ``round(fraction * total)`` (largest remainder), each
    at least 1 and leaving ``keep`` photos of every class behind where possible."""
    total = int(round(fraction * counts.sum()))
    ideal = fraction * counts
    out = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - out), kind="stable")[: max(0, total - out.sum())]:
        out[i] += 1
    return np.clip(np.maximum(out, 1), 0, np.maximum(counts - keep, 0))


def _straddling(plan: SplitPlan) -> bool:
    """Whether any group has photos in two parts (test / validation / train) or two folds."""
    part = {i: 0 for i in plan.train_ids} | {i: 1 for i in plan.val_ids} | {i: 2 for i in plan.test_ids}
    seen: dict[int, int] = {}
    for i, g in zip(plan.ids, plan.groups, strict=True):
        if seen.setdefault(g, part[i]) != part[i]:
            return True
    for folds in plan.cv_folds:
        fold_of: dict[int, int] = {}
        for g, f in zip(plan.groups, folds, strict=True):
            if f >= 0 and fold_of.setdefault(g, f) != f:
                return True
    return False


def _group_holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, *, keep: int, seed: int) -> np.ndarray | None:
    """Positions of a stratified share ``fraction`` of whole groups, with every class held out
    at least once and ``keep`` photos of every class left behind; None when no draw can."""
    k = int(min(max(2, round(1 / fraction)), len(set(groups.tolist()))))
    if k < 2:
        return None
    classes = np.unique(labels)
    best = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels, groups)
        for j, (_, held) in enumerate(folds):
            held_counts = np.array([(labels[held] == c).sum() for c in classes])
            rest_counts = np.array([(labels == c).sum() for c in classes]) - held_counts
            if (held_counts >= 1).all() and (rest_counts >= keep).all():
                score = (abs(len(held) - fraction * len(labels)), j)
                if best is None or score < best[0]:
                    best = (score, held)
    return None if best is None else best[1]


def _grouped_parts(ids: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, test_size: float, val_size: float,
                   seed: int) -> tuple[set[str], set[str]] | None:
    test_pos = _group_holdout(labels, groups, test_size, keep=2, seed=seed)
    if test_pos is None:
        return None
    rest = np.setdiff1d(np.arange(len(ids)), test_pos)
    val: set[str] = set()
    if val_size > 0:
        val_pos = _group_holdout(labels[rest], groups[rest], val_size, keep=1, seed=seed)
        if val_pos is None:
            return None
        val = set(ids[rest][val_pos].tolist())
    return set(ids[test_pos].tolist()), val


def plan_split(
    ids: Sequence[str],
    y: Sequence[str],
    *,
    groups: Sequence[int] | None = None,
    group_source: str = "",
    seed: int = 0,
    test_size: float = 0.2,
    val_size: float = 0.15,
    small_data_threshold: int = 1000,
    n_splits: int = 5,
    n_repeats: int | None = None,
) -> SplitPlan:
    """Plan a stratified test set, a validation subset and cross-validation folds.

    The plan depends only on the (id, label) pairs, the groups and the seed, not on row
    order. ``groups`` (one number per id) keeps photos of one group on one side of every
    split; when a class sits in too few groups for that, the plan is made per photo and
    says so (``kept_together`` is False). ``n_repeats=None`` means 5 repeats of
    ``n_splits``-fold cross-validation for small data and a single k-fold pass otherwise
    (enough for out-of-fold probabilities); ``n_repeats=0`` plans no cross-validation.
    ``val_size`` is a fraction of the training part.
    """
    ids = [str(i) for i in ids]
    labels = np.asarray([str(v) for v in y])
    if len(ids) != len(labels):
        raise ValueError(f"Got {len(ids)} photo ids but {len(labels)} labels.")
    if len(set(ids)) != len(ids):
        raise ValueError("Photo ids must be unique; the same photo is listed twice.")
    if groups is not None and len(groups) != len(ids):
        raise ValueError(f"Got {len(ids)} photo ids but {len(groups)} groups.")
    if not 0 < test_size < 1 or not 0 <= val_size < 1:
        raise ValueError(f"test_size must be in (0, 1) and val_size in [0, 1), got {test_size}, {val_size}.")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}.")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise InputError("All photos have the same label. Label photos of at least two kinds to train a model.")
    small = [f"'{c}' ({n})" for c, n in zip(classes, counts, strict=True) if n < 3]
    if small:
        raise InputError(
            "Some labels have too few photos to train and test on: "
            + ", ".join(small)
            + ". Every label needs at least 3 photos (10 or more to get useful results)."
        )

    order = np.argsort(np.asarray(ids), kind="stable")  # row order must not matter
    sorted_ids = np.asarray(ids)[order]
    sorted_labels = labels[order]
    sorted_groups = None
    if groups is not None and len(set(groups)) < len(ids):
        # groups renumbered by their first photo in id order: the plan depends on the partition only
        first: dict = {}
        sorted_groups = np.array([first.setdefault(g, len(first)) for g in np.asarray(groups)[order].tolist()])
    parts = None
    if sorted_groups is not None:
        parts = _grouped_parts(sorted_ids, sorted_labels, sorted_groups, test_size=test_size, val_size=val_size,
                               seed=seed)
    if parts is None:
        sorted_groups = None
        rng = np.random.default_rng(seed)
        by_class = [rng.permutation(sorted_ids[sorted_labels == c]) for c in classes]
        n_test = _allocate(counts, test_size, keep=2)
        rest = counts - n_test
        n_val = _allocate(rest, val_size, keep=1) if val_size > 0 else np.zeros_like(rest)
        test, val = set(), set()
        for members, t, v in zip(by_class, n_test, n_val, strict=True):
            test.update(members[:t].tolist())
            val.update(members[t : t + v].tolist())
    else:
        test, val = parts

    if n_repeats is None:
        n_repeats = 5 if len(ids) < small_data_threshold else 1
    cv_folds: list[list[int]] = []
    k = n_splits
    if n_repeats > 0:
        is_train_sorted = np.array([i not in test for i in sorted_ids])
        tr_ids, tr_labels = sorted_ids[is_train_sorted], sorted_labels[is_train_sorted]
        pos = {i: p for p, i in enumerate(ids)}
        tr_pos = np.array([pos[i] for i in tr_ids])
        folds = np.full((n_repeats, len(ids)), -1, dtype=int)
        if sorted_groups is None:
            k = int(max(2, min(n_splits, np.unique(tr_labels, return_counts=True)[1].min())))
            splitter = RepeatedStratifiedKFold(n_splits=k, n_repeats=n_repeats, random_state=seed)
            for j, (_, score_idx) in enumerate(splitter.split(tr_ids, tr_labels)):
                folds[j // k, tr_pos[score_idx]] = j % k
        else:
            tr_groups = sorted_groups[is_train_sorted]
            groups_per_class = [len(set(tr_groups[tr_labels == c].tolist())) for c in classes]
            k = int(max(2, min(n_splits, min(groups_per_class), len(set(tr_groups.tolist())))))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
                for r in range(n_repeats):
                    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + r)
                    for j, (_, score_idx) in enumerate(splitter.split(tr_ids, tr_labels, tr_groups)):
                        folds[r, tr_pos[score_idx]] = j
        cv_folds = folds.tolist()

    group_of = {}
    if sorted_groups is not None:
        group_of = dict(zip(sorted_ids.tolist(), sorted_groups.tolist(), strict=True))
    return SplitPlan(
        ids=ids,
        train_ids=[i for i in ids if i not in test and i not in val],
        val_ids=[i for i in ids if i in val],
        test_ids=[i for i in ids if i in test],
        cv_folds=cv_folds,
        n_splits=k,
        n_repeats=n_repeats,
        seed=seed,
        test_size=test_size,
        val_size=val_size,
        small_data_threshold=small_data_threshold,
        groups=[group_of[i] for i in ids] if group_of else [],
        group_source=group_source if group_of else "",
    )
