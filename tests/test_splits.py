"""The split plan: stratified, disjoint, reproducible, stored as JSON."""

from __future__ import annotations

import numpy as np
import pytest

from core.base.problems import InputError
from core.learning.splits import SplitPlan, plan_split
from tests.evaluation_data import features, json_round_trip


@pytest.mark.parametrize("k", [2, 3])
def test_plan_is_stratified_disjoint_and_complete(k):
    _, y, ids = features(n=300, k=k, weights=[0.7, 0.3] if k == 2 else None)
    plan = plan_split(ids, y, seed=3)
    train, val, test = set(plan.train_ids), set(plan.val_ids), set(plan.test_ids)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(ids)
    assert len(test) == 60
    label = dict(zip(ids, y, strict=True))
    for c in np.unique(y):
        share_all = np.mean(y == c)
        assert abs(np.mean([label[i] == c for i in test]) - share_all) < 0.03
        assert abs(np.mean([label[i] == c for i in val]) - share_all) < 0.06
    assert plan.small_data and plan.n_repeats == 5 and plan.n_splits == 5


def test_plan_is_reproducible_order_free_and_json_round_trips():
    _, y, ids = features(n=150)
    plan = plan_split(ids, y, seed=7)
    assert plan_split(ids, y, seed=7) == plan
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = plan_split([ids[i] for i in perm], y[perm], seed=7)
    assert set(shuffled.test_ids) == set(plan.test_ids) and set(shuffled.val_ids) == set(plan.val_ids)
    assert set(plan_split(ids, y, seed=8).test_ids) != set(plan.test_ids)
    assert SplitPlan.from_dict(json_round_trip(plan.to_dict())) == plan
    broken = plan.to_dict() | {"test_ids": plan.test_ids[:-1]}
    with pytest.raises(ValueError, match="inconsistent"):
        SplitPlan.from_dict(broken)


def test_cv_folds_cover_each_training_photo_once_per_repeat():
    _, y, ids = features(n=120, k=3)
    plan = plan_split(ids, y, n_repeats=2)
    test = set(plan.test_ids)
    splits = list(plan.cv_splits())
    assert len(splits) == 2 * plan.n_splits
    for r in range(2):
        scored = np.concatenate([s for rr, _, _, s in splits if rr == r])
        assert sorted(scored.tolist()) == sorted(i for i, pid in enumerate(ids) if pid not in test)
    for _, _, fit, score in splits:
        assert not set(fit) & set(score)
        assert not {ids[i] for i in fit} & test


def test_large_data_gets_one_pass_and_tiny_classes_are_refused():
    _, y, ids = features(n=200)
    assert plan_split(ids, y, small_data_threshold=100).n_repeats == 1
    assert plan_split(ids, y, n_repeats=0).cv_folds == []
    y = y.copy()
    y[:2] = "pet"
    with pytest.raises(InputError, match="'pet' \\(2\\)"):
        plan_split(ids, y)


# --------------------------------------------------------------------------- reports
