"""A project's training runs on disk: what each run learned from, how it scored, which is latest.

A run is kept under ``runs/<run id>/`` as a JSON :class:`RunRecord` plus per-photo
probabilities (``predictions.npz``); its model is a bundle under ``models/``. Both methods
are scored on the held-out photos of one stored split plan (:func:`split_plan`), made once
and reused while the labelled photos stay the same. This module reads and writes runs;
:mod:`core.learning.training` makes them, :mod:`core.learning.models` uses their models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.base.files import atomic_file, atomic_write_text
from core.learning import bundles, evaluation, extraction, splits
from core.learning.groups import photo_grouping
from core.projects.state import ProjectState
from core.projects.workspace import Project

__all__ = [
    "RunRecord", "class_order", "confidence_of", "labels_changed", "labels_signature", "latest_runs", "load_run",
    "save_run", "split_plan", "test_predictions", "trained_counts",
]


@dataclass(frozen=True)
class RunRecord:
    """One training run as the pages show it."""

    id: str
    kind: str  # "frozen" | "finetuned"
    backbone_id: str
    bundle_path: str
    classes: list[str]
    positive: str | None
    threshold: float | None
    test_ids: list[str]
    test_report: dict
    headline: str
    seconds: float
    created_at: float
    extra: dict

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def save_run(project: Project, record: RunRecord, arrays: dict[str, np.ndarray]) -> None:
    """Keep a finished run (record + per-photo probabilities) and make it its kind's latest."""
    folder = project.path("runs", record.id)
    with atomic_file(folder / "predictions.npz") as fh:
        np.savez(fh, **arrays)
    atomic_write_text(folder / "run.json", json.dumps(record.to_dict(), default=str))
    ProjectState(project).record_run(record.kind, record.id)


def load_run(project: Project, run_id: str) -> tuple[RunRecord, dict[str, np.ndarray]]:
    folder = project.root / "runs" / run_id
    record = RunRecord(**json.loads((folder / "run.json").read_text()))
    with np.load(folder / "predictions.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return record, arrays


def latest_runs(project: Project) -> dict[str, RunRecord]:
    """The latest run of each kind ("frozen", "finetuned") that still exists on disk."""
    runs = {}
    for kind, run_id in ProjectState(project).latest_run_ids.items():
        try:
            runs[kind] = load_run(project, run_id)[0]
        except (OSError, ValueError, TypeError):
            continue
    return runs


def split_plan(project: Project, ids: list[str], y: list[str], *, seed: int = 0, groups: list[int] | None = None,
               group_source: str = "") -> splits.SplitPlan:
    """The project's split plan, made once and reused while the labelled photos (and the
    groups that must stay together, :mod:`core.learning.groups`) stay the same.

    ``groups`` default to the project's (:func:`core.learning.groups.photo_grouping` on the
    chosen backbone's features); training passes them, found on the features it has loaded."""
    if groups is None:
        grouping = photo_grouping(project, ids)
        groups, group_source = grouping.groups, grouping.source
    path = project.path("runs", "split_plan.json")
    signature = labels_signature(ids, y, seed) + _groups_signature(ids, groups)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("signature") == signature:
            return splits.SplitPlan.from_dict(stored["plan"])
    plan = splits.plan_split(ids, y, seed=seed, groups=groups, group_source=group_source)
    atomic_write_text(path, json.dumps({"signature": signature, "plan": plan.to_dict()}))
    return plan


def _groups_signature(ids: list[str], groups: list[int] | None) -> str:
    """A fingerprint of which photos share a group ("" when every photo is on its own)."""
    if groups is None or len(set(groups)) == len(groups):
        return ""
    members: dict[int, list[str]] = {}
    for i, g in zip(ids, groups, strict=True):
        members.setdefault(g, []).append(str(i))
    digest = hashlib.sha256()
    for group in sorted(sorted(m) for m in members.values() if len(m) > 1):
        digest.update(("\t".join(group) + "\n").encode())
    return "-g" + digest.hexdigest()[:12]


def labels_signature(ids: list[str], y: list[str], seed: int) -> str:
    """A fingerprint of which photos carry which label (and the split seed): it changes with any relabelling."""
    digest = hashlib.sha256()
    for i, label in sorted(zip(ids, y)):
        digest.update(f"{i}\t{label}\n".encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()[:16]


def test_predictions(project: Project, run: RunRecord) -> pd.DataFrame:
    """Per-photo results of a run on the held-out photos: sha, name, true, predicted, confidence."""
    _, arrays = load_run(project, run.id)
    proba = arrays["test_proba"]
    ids = [str(i) for i in arrays["test_ids"]]
    predicted = evaluation.predict_labels(proba, classes=run.classes, positive=run.positive, threshold=run.threshold)
    ds = project.dataset().set_index("sha")
    return pd.DataFrame({
        "sha": ids,
        "name": [ds["name"].get(i, i) for i in ids],
        "label": [ds["label"].get(i, "") for i in ids],
        "predicted": list(predicted),
        "confidence": confidence_of(proba, predicted, run.classes),
    })


def confidence_of(proba: np.ndarray, predicted, classes: list[str]) -> np.ndarray:
    """The probability of the label given (not the largest one: they differ off a 0.5 threshold)."""
    index = {c: i for i, c in enumerate(classes)}
    return proba[np.arange(len(proba)), [index[str(p)] for p in predicted]]


def trained_counts(run: RunRecord) -> dict[str, int] | None:
    """Photos per class a run used (its training manifest plus its held-out photos); None if unknown."""
    try:
        manifest = bundles.load_bundle(run.bundle_path)[0].training_manifest.get("per_class", {})
        rep = run.test_report["report"]
        support = dict(zip(rep["index"], (row[rep["columns"].index("support")] for row in rep["data"])))
    except (bundles.BundleError, OSError, KeyError, ValueError):
        return None
    if not manifest:
        return None
    return {c: int(manifest.get(c, 0)) + int(support.get(c, 0)) for c in run.classes}


def labels_changed(project: Project, run: RunRecord) -> str | None:
    """A plain sentence when the labelled photos differ from those the run learned from, else None.

    Compares the same signature of (photo, label) pairs that decides when the split plan is
    made again, so a relabelling that keeps every class's count is caught too.
    """
    then_signature, seed = run.extra.get("labels_signature"), 0
    if then_signature is None:  # a run from before runs kept it: the plan it was trained with
        path = project.path("runs", "split_plan.json")
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        # the plan's signature may end with its groups' ("-g..."): the labels' part comes first
        then_signature, seed = (stored.get("signature") or "")[:16], int(stored.get("plan", {}).get("seed", 0))
    y, ids = extraction.training_labels(project, run.backbone_id)
    if labels_signature(ids, list(y), seed) == then_signature:
        return None
    message = "The labels have changed since this model was trained"
    then = trained_counts(run)
    if then is not None:
        now = pd.Series(y).value_counts()
        classes = sorted(set(then) | set(now.index), key=lambda c: (c != run.positive, c))
        names = project.class_names()

        def per_class(counts) -> str:
            return ", ".join(f"{int(counts.get(c, 0)):,} “{names.get(c, c)}”" for c in classes)

        if any(int(now.get(c, 0)) != then.get(c, 0) for c in classes):
            message += f" (now {per_class(now)}; then {per_class(then)})"
    return message + ": train again on the Train & compare step so that the model includes the changes."


def class_order(project: Project) -> list[str]:
    """The classes in the order every chart and table shows them: the tag itself (positive class) first."""
    runs = latest_runs(project)
    run = runs.get("frozen") or next(iter(runs.values()), None)
    if run is None:
        return sorted(set(project.training_set()["label"]))
    return sorted(run.classes, key=lambda c: c != run.positive)
