"""Looking at a project's photos through its features: the map, and the labels the model doubts.

:func:`feature_map` places every photo with features on a 2-D map (UMAP, computed once per
set of photos and kept), with its label and the quick model's out-of-fold answer;
:func:`label_issues` ranks the photos whose label that model finds hardest to believe.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.learning import comparison, evaluation, projection, runs
from core.learning.extraction import cached_array, feature_store
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import features

__all__ = ["feature_map", "label_issues"]


def feature_map(project: Project, *, method: str = "umap") -> pd.DataFrame:
    """Every photo with features placed on a 2-D map, with its label and the frozen model's opinion.

    The map is computed once per set of photos and kept in the project (UMAP's first fit
    in a process costs several seconds).
    """
    backbone_id = ProjectState(project).backbone
    if not backbone_id:
        return pd.DataFrame()
    key = features.feature_key(backbone_id)
    store = feature_store(project)
    ds = project.dataset()
    ds = ds[ds["sha"].isin(store.has(key))].reset_index(drop=True)
    if len(ds) < 3:
        return pd.DataFrame()
    xy = cached_array(project, f"map-{method}", [key, *ds["sha"]],
                      lambda: projection.project_2d(store.load(key, list(ds["sha"])), method=method))
    ds["x"], ds["y"] = xy[:, 0], xy[:, 1]
    ds["predicted"], ds["confidence"] = "", np.nan
    run = runs.latest_runs(project).get("frozen")
    if run is not None:
        _, arrays = runs.load_run(project, run.id)
        ids = [str(i) for i in arrays["ids"]]
        pos = {sha: i for i, sha in enumerate(ids)}
        rows = [i for i, sha in enumerate(ds["sha"]) if sha in pos]
        proba = arrays["oof_proba"][[pos[ds["sha"][i]] for i in rows]]
        predicted = evaluation.predict_labels(proba, classes=run.classes, positive=run.positive, threshold=run.threshold)
        ds.loc[rows, "predicted"] = list(predicted)
        ds.loc[rows, "confidence"] = runs.confidence_of(proba, predicted, run.classes)
    return ds


def label_issues(project: Project) -> pd.DataFrame:
    """Photos whose label the frozen model doubts most (from out-of-fold probabilities)."""
    latest = runs.latest_runs(project)
    if "frozen" not in latest:
        return pd.DataFrame()
    run = latest["frozen"]
    _, arrays = runs.load_run(project, run.id)
    ids = [str(i) for i in arrays["ids"]]
    truth = project.dataset().set_index("sha")
    ids = [i for i in ids if i in truth.index]
    proba = comparison.align_proba(arrays["oof_proba"], [str(i) for i in arrays["ids"]], to=ids)
    issues = comparison.rank_label_issues(ids, [truth["label"][i] for i in ids], proba, classes=run.classes)
    issues["name"] = [truth["name"][i] for i in issues["id"]]
    return issues
