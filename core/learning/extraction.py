"""Feature extraction for a whole project: which photos, which cache, what is ready.

``core.vision.features`` knows photos and arrays; this module knows projects. The Backbone page,
the background job and the command line all go through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.base.files import atomic_file
from core.base.problems import Problem
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import features, tuning, weights
from core.vision.store import FeatureStore


@dataclass(frozen=True)
class FeatureStatus:
    backbone_id: str
    key: str
    photos: int
    ready: int
    failed: int

    @property
    def complete(self) -> bool:
        return self.photos > 0 and self.ready + self.failed >= self.photos


def feature_store(project: Project) -> FeatureStore:
    """The project's feature cache."""
    return FeatureStore(project.path("features"))


def status(project: Project, backbone_id: str, *, store: FeatureStore | None = None) -> FeatureStatus:
    """How many of the project's photos already have features for this backbone.

    A backbone whose weights are not on this computer has none yet (``key`` is empty). A caller
    that reads the store next passes its own ``store``, so the chunks' photo ids are read once.
    """
    shas = set(project.dataset()["sha"])
    try:
        key = features.feature_key(backbone_id)
    except weights.WeightsUnavailable:
        return FeatureStatus(backbone_id, "", len(shas), 0, 0)
    store = store or feature_store(project)
    ready = len(shas & store.has(key))
    failed = len(shas & set(store.failures(key)))
    return FeatureStatus(backbone_id, key, len(shas), ready, failed)


def extract_project(
    project: Project,
    backbone_id: str,
    *,
    device: str | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """Compute (or reuse) the features of every photo; returns a JSON-able summary."""
    report = on_progress or (lambda done, total, message: None)
    report(0, 0, "Preparing the network")
    weights.ensure_weights(
        backbone_id,
        on_progress=lambda done, total: report(done >> 20, max(total >> 20, 1), "Downloading the network (MB)"),
    )
    dataset = project.dataset()
    names = dict(zip(dataset["sha"], dataset["name"]))
    items = [(sha, project.image_path(sha)) for sha in dataset["sha"]]
    store = feature_store(project)
    result = features.extract_features(
        items,
        backbone_id=backbone_id,
        store=store,
        device=device,
        on_progress=lambda done, total: report(done, total, "Extracting features"),
        should_cancel=should_cancel,
    )
    project.replace_problems(f"features:{backbone_id}", [
        Problem("feature_failed", f"{names.get(sha, sha)}: {reason}", file=names.get(sha))
        for sha, reason in result.failed
    ])
    summary = {
        "backbone": backbone_id,
        "key": result.key,
        "computed": result.computed,
        "reused": result.reused,
        "failed": len(result.failed),
        "seconds": round(result.seconds, 2),
        "photos_per_s": round(result.photos_per_s, 2),
        "device": result.device,
        "batch_size": result.batch_size,
        "cancelled": result.cancelled,
    }
    if not result.cancelled:
        state = ProjectState(project)
        state.set_backbone(backbone_id)
        state.record_extraction(summary)
    return summary


def training_labels(project: Project, backbone_id: str) -> tuple[np.ndarray, list[str]]:
    """Labels and photo ids of the training set that has features (no feature is read)."""
    training = project.training_set()
    training = training[training["sha"].isin(feature_store(project).has(features.feature_key(backbone_id)))]
    return training["label"].to_numpy(), list(training["sha"])


def load_training_features(project: Project, backbone_id: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, labels and photo ids of the training set (photos without features are left out)."""
    y, ids = training_labels(project, backbone_id)
    return feature_store(project).load(features.feature_key(backbone_id), ids), y, ids


def cached_array(project: Project, name: str, depends_on: Sequence[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, kept in the project's runs folder under ``name`` and a digest of what it
    ``depends_on`` (the feature key and the photo ids), so a page drawn again reads a file instead
    of recomputing it; the file of ``name`` computed for other photos before is removed."""
    digest = hashlib.sha256("\n".join(depends_on).encode()).hexdigest()[:16]
    path = project.path("runs", f"{name}-{digest}.npy")
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # damaged: computed again
            pass
    value = np.asarray(compute())
    with atomic_file(path) as fh:
        np.save(fh, value, allow_pickle=False)
    for old in path.parent.glob(f"{name}-*.npy"):
        if old != path:
            old.unlink(missing_ok=True)
    return value


def known_speed(backbone_id: str, *, device: str | None = None, n_images: int = 32) -> float | None:
    """The speed measured earlier on this machine (photos/s), or None: never measures."""
    return tuning.remembered_speed(backbone_id, device, n_images=n_images)
