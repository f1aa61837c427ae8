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


def _sides(plan: SplitPlan) -> dict[str, str]:
    return {i: "train" for i in plan.train_ids} | {i: "val" for i in plan.val_ids} | {i: "test" for i in plan.test_ids}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_never_puts_one_group_on_both_sides(seed):
    """Several shots of one product: a per-photo split puts the same product on both sides;
    the group-aware plan keeps each group on one side of the holdout and in one CV fold."""
    rng = np.random.default_rng(seed)
    n = 240
    group = rng.integers(0, 70, n)  # ~3.4 photos per product
    y = np.where(rng.random(n) < 0.3, "person", "no_person")  # labels vary inside a group too
    ids = [f"photo{i:03d}" for i in range(n)]
    members = {g: [i for i, gg in zip(ids, group, strict=True) if gg == g] for g in set(group.tolist())}

    def straddling(plan) -> int:
        side = _sides(plan)
        count = sum(len({side[i] for i in m}) > 1 for m in members.values())
        for folds in plan.cv_folds:
            fold = dict(zip(plan.ids, folds, strict=True))
            count += sum(len({fold[i] for i in m if fold[i] >= 0}) > 1 for m in members.values())
        return count

    per_photo = plan_split(ids, y, seed=seed)
    assert straddling(per_photo) > 0  # what a per-photo split does to products with several shots

    plan = plan_split(ids, y, groups=group.tolist(), group_source="column", seed=seed)
    assert plan.kept_together and plan.group_source == "column"
    assert straddling(plan) == 0
    assert set(plan.train_ids) | set(plan.val_ids) | set(plan.test_ids) == set(ids)
    assert 0.15 < len(plan.test_ids) / n < 0.25
    label = dict(zip(ids, y, strict=True))
    assert {label[i] for i in plan.test_ids} == {"person", "no_person"}
    again = SplitPlan.from_dict(json_round_trip(plan.to_dict()))
    assert again.groups == plan.groups and again.kept_together
    # the plan depends on the partition, not on how the groups are numbered or the row order
    renumbered = plan_split(ids[::-1], y[::-1], groups=(group[::-1] * 7 + 3).tolist(), seed=seed)
    assert renumbered.test_ids and set(renumbered.test_ids) == set(plan.test_ids)


def test_group_split_refuses_a_stored_plan_that_splits_a_group_and_falls_back_when_it_cannot_keep_them():
    ids = [f"p{i:02d}" for i in range(40)]
    y = ["a"] * 20 + ["b"] * 20
    plan = plan_split(ids, y, groups=[i // 2 for i in range(40)])
    d = plan.to_dict()
    moved = plan.test_ids[0]  # its partner (same product) stays among the test photos
    assert ids[ids.index(moved) ^ 1] in plan.test_ids
    d["test_ids"].remove(moved)
    d["train_ids"].append(moved)
    with pytest.raises(ValueError, match="both sides"):
        SplitPlan.from_dict(d)
    # every "b" photo is one product: it cannot be both trained on and tested, so the plan is per photo
    one_product = plan_split(ids, y, groups=list(range(20)) + [99] * 20)
    assert not one_product.kept_together and one_product.groups == []
    assert {y[ids.index(i)] for i in one_product.test_ids} == {"a", "b"}


def test_few_groups_fall_back_to_a_per_photo_plan():
    ids = [f"p{i:02d}" for i in range(24)]
    y = ["a"] * 12 + ["b"] * 12
    plan = plan_split(ids, y, groups=[i // 6 for i in range(24)])  # 4 groups of 6, one label each
    assert not plan.kept_together and len(plan.test_ids) > 0
