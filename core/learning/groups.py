"""Which photos must stay together when models are tested: products and near-duplicates.

Several shots of one product, or two near-identical photos, on both sides of a split let a
model "recognise" a photo it has practically seen, and inflate its score. The split plan
(:mod:`core.learning.splits`) therefore keeps each group on one side. Groups come from:

* the label sheet's product/group column, when the analyst has one (the Data step finds
  it; :func:`core.projects.intake.photo_groups` gives each photo its value), else
* near-duplicates found in feature space: photos whose features have a cosine similarity
  of at least :data:`NEAR_DUPLICATE_SIMILARITY` are joined (union-find), so a chain of
  near-identical shots becomes one group.

The threshold was measured on the shared photos (``benchmarks/bench_calibration.py
--near-duplicates``, EfficientNet-Lite0 features): at 0.92, 82 % (catalog) and 85 % (everyday)
of edited copies of a photo (JPEG quality 40, 60 % size, 90 % crop, mirrored, 15 % brighter)
are joined to their original, while of the 114,959 pairs of different catalog photos only 30
are: the same model in the same pose wearing the same shirt in another colour, shots of one
product line that would leak just the same. No two different everyday photos come near (the
most similar pair scores 0.59). At 0.95 a third of the edited copies are missed; at 0.90
different products of one shoot (another shirt, same model) start to join (83 pairs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.learning import extraction
from core.learning.splits import SplitPlan
from core.projects import intake
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import backbones

__all__ = [
    "NEAR_DUPLICATE_SIMILARITY",
    "Grouping",
    "near_duplicate_groups",
    "photo_grouping",
    "split_record",
    "split_sentence",
]

NEAR_DUPLICATE_SIMILARITY = 0.92
_BLOCK = 2048  # rows of the similarity matrix computed at a time (2048 x n floats)


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def near_duplicate_groups(X, *, threshold: float = NEAR_DUPLICATE_SIMILARITY) -> np.ndarray:
    """A group number per row of ``X``: rows whose cosine similarity reaches ``threshold``
    are in one group, and so are chains of them (union-find). Singletons keep their own."""
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    parent = np.arange(n)
    if n < 2:
        return parent
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    for start in range(0, n, _BLOCK):
        sim = unit[start : start + _BLOCK] @ unit.T
        rows, cols = np.nonzero(sim >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if c > r:
                a, b = _find(parent, int(r)), _find(parent, int(c))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = np.array([_find(parent, i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


@dataclass(frozen=True)
class Grouping:
    """The group of each photo and where the groups came from."""

    ids: list[str]
    groups: list[int]  # one per id; photos sharing a number stay on one side of every split
    source: str  # "column" (the label sheet's) | "near_duplicates" | "none"
    column: str | None = None

    @property
    def n_groups(self) -> int:
        return len(set(self.groups))

    @property
    def n_together(self) -> int:
        """Photos that share their group with at least one other photo."""
        counts = np.bincount(self.groups) if self.groups else np.zeros(0, dtype=int)
        return int(counts[counts > 1].sum())

    @property
    def n_shared_groups(self) -> int:
        """Groups of two photos or more."""
        counts = np.bincount(self.groups) if self.groups else np.zeros(0, dtype=int)
        return int((counts > 1).sum())

    def summary(self) -> str:
        """One plain sentence for the Data page."""
        n = len(self.ids)
        if self.source == "column":
            return (
                f"{n:,} labelled photos belong to {self.n_groups:,} products (column “{self.column}”); "
                f"{self.n_together:,} photos share their product with another photo. Photos of one product are "
                "always kept on the same side when the models are tested."
            )
        if self.n_shared_groups == 0:
            return (
                f"No near-duplicate photos found among the {n:,} labelled photos: each photo is tested on its own. "
                "If several photos show the same product, choose the sheet's product column under “Change the columns” above."
            )
        return (
            f"Found {self.n_together:,} near-duplicate photos in {self.n_shared_groups:,} sets "
            f"({self.n_groups:,} groups in all, {n:,} labelled photos). Each set is kept on the same side when "
            "the models are tested, so a model is never tested on a photo it has practically seen."
        )


def _from_values(ids: Sequence[str], values: Mapping[str, str]) -> list[int]:
    # Photos without a value are their own group.
    keys = [values.get(i) or f"\0{i}" for i in ids]
    return np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].tolist()


def photo_grouping(project: Project, ids: Sequence[str], X=None, *, backbone_id: str | None = None) -> Grouping:
    """The groups of these labelled photos: the sheet's product column when one is chosen,
    else near-duplicates in the features ``X`` (rows follow ``ids``; loaded from the feature
    cache of ``backbone_id``, default the project's backbone, when not given; no features yet:
    every photo on its own)."""
    ids = [str(i) for i in ids]
    column, values = intake.photo_groups(project)
    if column:
        return Grouping(ids, _from_values(ids, values), "column", column)
    if X is not None:
        return Grouping(ids, near_duplicate_groups(X).tolist(), "near_duplicates")
    backbone_id = backbone_id or ProjectState(project).backbone or backbones.DEFAULT_BACKBONE_ID
    store = extraction.feature_store(project)
    status = extraction.status(project, backbone_id, store=store)
    if not status.complete:
        return Grouping(ids, list(range(len(ids))), "none")
    key, stored = status.key, store.has(status.key)  # the store read the chunks' ids once
    have = [i for i in ids if i in stored]  # a photo whose features failed is its own group
    # Kept in the project: the Data page asks on every redraw, and at 10,000 photos comparing every
    # pair takes seconds.
    found = dict(zip(have, extraction.cached_array(
        project, "near-duplicates", [key, str(NEAR_DUPLICATE_SIMILARITY), *have],
        lambda: near_duplicate_groups(store.load(key, have))).tolist())) if have else {}
    groups = [found[i] if i in found else len(ids) + k for k, i in enumerate(ids)]
    return Grouping(ids, np.unique(groups, return_inverse=True)[1].tolist(), "near_duplicates")


def split_record(plan: SplitPlan, grouping: Grouping) -> dict:
    """What a training run keeps about its split's groups (for :func:`split_sentence`)."""
    return {
        "source": grouping.source,
        "column": grouping.column,
        "n_groups": grouping.n_groups,
        "n_together": grouping.n_together,
        "n_sets": grouping.n_shared_groups,
        "kept_together": plan.kept_together,
    }


def split_sentence(record: Mapping | None) -> str:
    """The Train page's sentence on whether the split kept products / near-duplicates together."""
    if not record:
        return ""
    column = record.get("column")
    if record.get("n_sets", 0) == 0:
        return (
            "No near-duplicate photos or shared products were found, so the photos were split one by one "
            "into training and held-out photos."
        )
    what = (
        f"{record['n_together']:,} photos that share a product (column “{column}”, {record['n_sets']:,} products)"
        if record.get("source") == "column"
        else f"{record['n_together']:,} near-duplicate photos ({record['n_sets']:,} sets)"
    )
    if record.get("kept_together"):
        return (
            f"The split kept the {what} together: each set is wholly among the held-out photos or wholly "
            "among the training photos, so no model is scored on a photo it has practically seen."
        )
    return (
        f"The {what} could not be kept together (a label has its photos in too few groups), so the photos "
        "were split one by one; the scores may be a little optimistic."
    )
