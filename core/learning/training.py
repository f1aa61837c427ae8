"""Training for a whole project: one split plan, the frozen head, fine-tuning, the comparison.

Both methods are scored on the same held-out photos of one stored split plan. Each run is
kept under ``runs/<run id>/`` (a JSON record plus per-photo probabilities) and its model
as a bundle under ``models/``; the project's ``models`` meta points at the latest of each
kind, so the Train page, the Explore page and tagging read the same state.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.base.files import atomic_write_bytes, atomic_write_text
from core.base.problems import InputError
from core.learning import comparison, evaluation, finetune_config, finetune_loop, splits
from core.projects.workspace import Project
from core.vision import weights
from core.vision.store import FeatureStore

Progress = Callable[[int, int, str], None]


def _positive(classes: list[str], names: dict[str, str]) -> str | None:
    """For two classes, the one that means "has the tag" (e.g. "person", "1", "yes")."""
    if len(classes) != 2:
        return None
    for c in classes:
        key = f"{c} {names.get(c, '')}".casefold()
        if key.strip() in {"1", "true", "yes"} or (key.split() and key.split()[0] in {"1", "true", "yes"}):
            return c
    negatives = [c for c in classes if c.casefold().startswith(("no", "not", "0", "false"))]
    if len(negatives) == 1:
        return next(c for c in classes if c != negatives[0])
    return classes[1]


def split_plan(project: Project, ids: list[str], y: list[str], *, seed: int = 0) -> splits.SplitPlan:
    """The project's split plan, made once and reused while the labelled photos stay the same."""
    path = project.path("runs", "split_plan.json")
    signature = evaluation_signature(ids, y, seed)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("signature") == signature:
            return splits.SplitPlan.from_dict(stored["plan"])
    plan = splits.plan_split(ids, y, seed=seed)
    atomic_write_text(path, json.dumps({"signature": signature, "plan": plan.to_dict()}))
    return plan


def evaluation_signature(ids: list[str], y: list[str], seed: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    for i, label in sorted(zip(ids, y)):
        digest.update(f"{i}\t{label}\n".encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()[:16]


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


def _save_run(project: Project, record: RunRecord, arrays: dict[str, np.ndarray]) -> None:
    folder = project.path("runs", record.id)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(folder / "predictions.npz", buf.getvalue())
    atomic_write_text(folder / "run.json", json.dumps(record.to_dict(), default=str))
    models = project.get_meta("models", {})
    models[record.kind] = record.id
    project.set_meta("models", models)
    project.set_meta("model_ready", True)


def load_run(project: Project, run_id: str) -> tuple[RunRecord, dict[str, np.ndarray]]:
    folder = project.root / "runs" / run_id
    record = RunRecord(**json.loads((folder / "run.json").read_text()))
    with np.load(folder / "predictions.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return record, arrays


def latest_runs(project: Project) -> dict[str, RunRecord]:
    """The latest run of each kind ("frozen", "finetuned") that still exists on disk."""
    runs = {}
    for kind, run_id in (project.get_meta("models", {}) or {}).items():
        try:
            runs[kind] = load_run(project, run_id)[0]
        except (OSError, ValueError, TypeError):
            continue
    return runs


def train_frozen(
    project: Project,
    *,
    backbone_id: str | None = None,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> RunRecord:
    """Cross-validate and fit the frozen-backbone classifier on the cached features."""
    from core.learning import bundles, extraction, heads
    from core.vision import backbones

    report = on_progress or (lambda d, t, m: None)
    backbone_id = backbone_id or project.get_meta("backbone", backbones.DEFAULT_BACKBONE_ID)
    X, y, ids = extraction.load_training_features(project, backbone_id)
    if len(ids) == 0:
        raise InputError("No photo has features yet: extract them on the Backbone step first.")
    classes = sorted(set(y))
    if len(classes) < 2:
        raise InputError("Training needs at least two classes of labelled photos.")
    names = project.class_names()
    positive = _positive(classes, names)
    plan = split_plan(project, ids, list(y), seed=seed)
    started = time.time()
    cv = evaluation.cross_validate_head(
        X, y, plan=plan, ids=ids, positive=positive,
        on_progress=lambda done, total: report(done, total, "Cross-validating the frozen classifier"),
    )
    seconds = time.time() - started
    bundle = bundles.ModelBundle(
        kind="frozen",
        backbone_id=backbone_id,
        weights_hash=weights.weights_hash(backbone_id),
        preprocessing=_preprocessing_dict(backbone_id),
        classes=list(cv.classes),
        class_display_names={c: names[c] for c in cv.classes if c in names},
        positive=cv.positive,
        threshold=cv.threshold,
        metrics={"test": cv.test_report.to_dict(), "cv": cv.summary},
        seed=seed,
        split=plan.to_dict(),
        training_manifest=bundles.training_manifest(plan.train_ids + plan.val_ids, [dict(zip(ids, y))[i] for i in plan.train_ids + plan.val_ids]),
        name=f"{project.name} · frozen {backbones.get_backbone(backbone_id).name}",
    )
    path = bundles.save_bundle(bundle, heads.head_to_arrays(cv.model), project.path("models", f"{bundle.id}.zip"))
    record = RunRecord(
        id=bundle.id, kind="frozen", backbone_id=backbone_id, bundle_path=str(path),
        classes=list(cv.classes), positive=cv.positive, threshold=cv.threshold,
        test_ids=list(cv.test_ids), test_report=cv.test_report.to_dict(), headline=cv.headline(),
        seconds=round(cv.fit_seconds, 3), created_at=time.time(),
        extra={"cv": cv.to_dict(), "cv_seconds": round(seconds, 2),
               "labels_signature": evaluation_signature(ids, list(y), 0)},
    )
    _save_run(project, record, {
        "ids": np.asarray(cv.ids), "oof_proba": cv.oof_proba, "in_test": cv.in_test,
        "test_ids": np.asarray(cv.test_ids), "test_proba": cv.test_proba,
    })
    return record


def _preprocessing_dict(backbone_id: str) -> dict:
    from dataclasses import asdict, is_dataclass

    from core.vision import backbones

    prep = backbones.get_backbone(backbone_id).preprocessing
    data = asdict(prep) if is_dataclass(prep) else dict(prep)
    return json.loads(json.dumps(data, default=str))


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
        "confidence": _confidence(proba, predicted, run.classes),
    })


def _confidence(proba: np.ndarray, predicted, classes: list[str]) -> np.ndarray:
    """The probability of the label given (not the largest one: they differ off a 0.5 threshold)."""
    index = {c: i for i, c in enumerate(classes)}
    return proba[np.arange(len(proba)), [index[str(p)] for p in predicted]]


def compare(project: Project, *, names: tuple[str, str] = ("Frozen", "Fine-tuned")) -> comparison.Comparison | None:
    """Frozen vs fine-tuned on the same held-out photos, once both exist (``names`` word the verdict)."""
    runs = latest_runs(project)
    if "frozen" not in runs or "finetuned" not in runs:
        return None
    a, b = runs["frozen"], runs["finetuned"]
    _, pa = load_run(project, a.id)
    _, pb = load_run(project, b.id)
    ids = [str(i) for i in pa["test_ids"]]
    proba_b = comparison.align_proba(pb["test_proba"], [str(i) for i in pb["test_ids"]], to=ids)
    truth = project.dataset().set_index("sha")["label"]
    return comparison.compare_methods(
        [truth[i] for i in ids], pa["test_proba"], proba_b, classes=a.classes, positive=a.positive,
        threshold_a=a.threshold, threshold_b=b.threshold, cost_a_seconds=a.seconds, cost_b_seconds=b.seconds,
        names=names,
    )


def label_issues(project: Project) -> pd.DataFrame:
    """Photos whose label the frozen model doubts most (from out-of-fold probabilities)."""
    runs = latest_runs(project)
    if "frozen" not in runs:
        return pd.DataFrame()
    run = runs["frozen"]
    _, arrays = load_run(project, run.id)
    ids = [str(i) for i in arrays["ids"]]
    truth = project.dataset().set_index("sha")
    ids = [i for i in ids if i in truth.index]
    proba = comparison.align_proba(arrays["oof_proba"], [str(i) for i in arrays["ids"]], to=ids)
    issues = comparison.rank_label_issues(ids, [truth["label"][i] for i in ids], proba, classes=run.classes)
    issues["name"] = [truth["name"][i] for i in issues["id"]]
    return issues


def bundle_path(project: Project, kind: str) -> Path | None:
    run = latest_runs(project).get(kind)
    return Path(run.bundle_path) if run else None


def feature_map(project: Project, *, method: str = "umap") -> pd.DataFrame:
    """Every photo with features placed on a 2-D map, with its label and the frozen model's opinion.

    The map is computed once per set of photos and kept in the project (UMAP's first fit
    in a process costs several seconds).
    """
    from core.learning import projection
    from core.vision.features import feature_key

    backbone_id = project.get_meta("backbone")
    if not backbone_id:
        return pd.DataFrame()
    key = feature_key(backbone_id)
    store = FeatureStore(project.path("features"))
    ds = project.dataset()
    ds = ds[ds["sha"].isin(store.has(key))].reset_index(drop=True)
    if len(ds) < 3:
        return pd.DataFrame()
    import hashlib

    digest = hashlib.sha256("\n".join([key, *ds["sha"]]).encode()).hexdigest()[:16]
    cache = project.path("runs", f"map-{method}-{digest}.npy")
    if cache.is_file():
        xy = np.load(cache, allow_pickle=False)
    else:
        xy = projection.project_2d(store.load(key, list(ds["sha"])), method=method)
        buf = io.BytesIO()
        np.save(buf, xy)
        atomic_write_bytes(cache, buf.getvalue())
    ds["x"], ds["y"] = xy[:, 0], xy[:, 1]
    ds["predicted"], ds["confidence"] = "", np.nan
    run = latest_runs(project).get("frozen")
    if run is not None:
        _, arrays = load_run(project, run.id)
        ids = [str(i) for i in arrays["ids"]]
        pos = {sha: i for i, sha in enumerate(ids)}
        rows = [i for i, sha in enumerate(ds["sha"]) if sha in pos]
        proba = arrays["oof_proba"][[pos[ds["sha"][i]] for i in rows]]
        predicted = evaluation.predict_labels(proba, classes=run.classes, positive=run.positive, threshold=run.threshold)
        ds.loc[rows, "predicted"] = list(predicted)
        ds.loc[rows, "confidence"] = _confidence(proba, predicted, run.classes)
    return ds


def train_finetuned(
    project: Project,
    *,
    backbone_id: str | None = None,
    seed: int = 0,
    config=None,
    device: str | None = None,
    on_progress: Progress | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> RunRecord | None:
    """Fine-tune the backbone on the plan's training photos, early-stop on its validation
    photos, and score it on the same held-out photos as the frozen head.

    The new head starts from a frozen head fit on the training photos only (a linear
    probe), so fine-tuning starts where the quick model is. Returns None when cancelled
    before anything useful was learned. A run that was cancelled or whose process died
    continues from its last completed epoch when asked again with the same photos, labels
    and settings (the checkpoint is kept in the project's ``runs/finetune-checkpoint``).
    """
    from core.learning import bundles, extraction, finetune, heads
    from core.vision import backbones

    report = on_progress or (lambda d, t, m: None)
    backbone_id = backbone_id or project.get_meta("backbone", backbones.DEFAULT_BACKBONE_ID)
    X, y, ids = extraction.load_training_features(project, backbone_id)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise InputError("Training needs at least two classes of labelled photos.")
    names = project.class_names()
    positive = _positive(classes, names)
    plan = split_plan(project, ids, list(y), seed=seed)
    label = dict(zip(ids, y))
    row = {sha: i for i, sha in enumerate(ids)}
    train_rows = [row[i] for i in plan.train_ids]
    probe = heads.make_frozen_head(random_state=seed).fit(X[train_rows], y[train_rows])
    items = lambda part: [(sha, project.image_path(sha), label[sha]) for sha in part]  # noqa: E731
    started = time.time()
    result = finetune.finetune(
        items(plan.train_ids), items(plan.val_ids), backbone_id=backbone_id, classes=classes,
        config=config or finetune_config.FinetuneConfig(seed=seed), head_arrays=heads.head_to_arrays(probe),
        head_classes=list(probe.classes_), positive=positive, device=device, on_epoch=on_epoch,
        on_progress=lambda done, total: report(done, total, "Fine-tuning"), should_cancel=should_cancel,
        checkpoint_dir=project.path("runs", "finetune-checkpoint"),
    )
    if result.cancelled and result.best_epoch < 0:
        return None
    report(0, len(plan.test_ids), "Scoring the held-out photos")
    test_items = [(sha, project.image_path(sha)) for sha in plan.test_ids]
    proba = finetune_loop.predict_proba(result.model, test_items, backbone_id=backbone_id, device=device)
    keep = ~np.isnan(proba).any(axis=1)
    test_ids = [sha for sha, ok in zip(plan.test_ids, keep) if ok]
    test_report = evaluation.evaluate_predictions(
        [label[i] for i in test_ids], proba[keep], classes=classes, positive=positive, threshold=result.threshold,
    )
    seconds = time.time() - started
    bundle = bundles.ModelBundle(
        kind="finetuned", backbone_id=backbone_id, weights_hash=weights.weights_hash(backbone_id),
        preprocessing=_preprocessing_dict(backbone_id), classes=classes,
        class_display_names={c: names[c] for c in classes if c in names}, positive=positive,
        threshold=result.threshold, metrics={"test": test_report.to_dict(), "history": result.history}, seed=seed,
        split=plan.to_dict(),
        training_manifest=bundles.training_manifest(plan.train_ids, [label[i] for i in plan.train_ids]),
        name=f"{project.name} · fine-tuned {backbones.get_backbone(backbone_id).name}",
    )
    path = bundles.save_bundle(bundle, {}, project.path("models", f"{bundle.id}.zip"),
                               network=finetune_loop.state_dict_for_bundle(result.model))
    acc = test_report.balanced_accuracy
    record = RunRecord(
        id=bundle.id, kind="finetuned", backbone_id=backbone_id, bundle_path=str(path), classes=classes,
        positive=positive, threshold=result.threshold, test_ids=test_ids, test_report=test_report.to_dict(),
        headline=f"Balanced accuracy {100 * acc.value:.1f} % on {test_report.n} held-out photos. " + _story(result),
        seconds=round(seconds, 1), created_at=time.time(),
        extra={"history": result.history, "best_epoch": result.best_epoch, "failures": len(result.failures),
               "resumed_epochs": result.resumed_epochs,
               "labels_signature": evaluation_signature(ids, list(y), 0),
               "device": str(result.device)},
    )
    _save_run(project, record, {"test_ids": np.asarray(test_ids), "test_proba": proba[keep]})
    return record


def _story(result) -> str:
    """How a fine-tuning run went, in one plain sentence."""
    n = len(result.history)
    rounds = f"{n} round{'' if n == 1 else 's'} (epochs)"
    how = {"completed": f"Trained for all {rounds}",
           "early_stopping": f"Stopped after {rounds}, once it no longer improved",
           "time_budget": f"Stopped after {rounds} at the time limit",
           "cancelled": f"Cancelled after {rounds}"}.get(result.stop_reason, f"Trained for {rounds}")
    if result.resumed_epochs:
        done = result.resumed_epochs
        how += f" (continued after an interruption, {done} round{'' if done == 1 else 's'} already done)"
    if result.best_epoch >= 0:
        return f"{how}; the version kept is the one from round {result.best_epoch + 1}."
    return f"{how}; no round beat its starting point (the quick model's classifier), so that is what is kept."


def threshold_effect(project: Project, run: RunRecord, threshold: float) -> dict:
    """What a decision threshold does on the held-out photos, counted in photos (binary only).

    Returns the positive class, how many held-out photos have it, how many of those would
    be missed, how many without it would be wrongly tagged, and the same at the run's own
    threshold for comparison.
    """
    if not run.positive:
        raise ValueError("Thresholds apply to two-class models only.")
    _, arrays = load_run(project, run.id)
    ids = [str(i) for i in arrays["test_ids"]]
    pos = run.classes.index(run.positive)
    score = arrays["test_proba"][:, pos]
    truth = project.dataset().set_index("sha")["label"]
    is_pos = np.array([truth.get(i, "") == run.positive for i in ids])

    def counts(t: float) -> tuple[int, int]:
        tagged = score >= t
        return int((is_pos & ~tagged).sum()), int((~is_pos & tagged).sum())

    missed, flagged = counts(threshold)
    base_missed, base_flagged = counts(run.threshold if run.threshold is not None else 0.5)
    return {"positive": run.positive, "n": len(ids), "n_positive": int(is_pos.sum()),
            "n_negative": int((~is_pos).sum()), "missed": missed, "flagged": flagged,
            "base_missed": base_missed, "base_flagged": base_flagged}


def set_threshold(project: Project, kind: str, threshold: float) -> None:
    """Use another decision threshold for tagging with this model (kept in the project)."""
    chosen = project.get_meta("thresholds", {}) or {}
    chosen[kind] = float(threshold)
    project.set_meta("thresholds", chosen)


def chosen_threshold(project: Project, run: RunRecord) -> float | None:
    return (project.get_meta("thresholds", {}) or {}).get(run.kind, run.threshold)


def what_is_learned(backbone_id: str, kind: str, n_classes: int) -> str:
    """One plain sentence on how many numbers a method learns and how many stay as pretrained."""
    from core.vision import backbones

    b = backbones.get_backbone(backbone_id)
    head = (b.feature_dim + 1) * (1 if n_classes == 2 else n_classes)
    total = b.params_features
    if kind == "frozen":
        return (f"Learns {head:,} numbers (a small classifier on the {b.feature_dim:,} features); "
                f"the {total / 1e6:.1f} million numbers of {b.name} stay as pretrained.")
    return (f"Learns all {total / 1e6:.1f} million numbers of {b.name} plus a new classifier "
            f"({(b.feature_dim + 1) * n_classes:,} numbers), in three stages: the classifier alone, then the "
            "last layers, then everything, with smaller changes for the earlier layers.")


def trained_counts(run: RunRecord) -> dict[str, int] | None:
    """Photos per class a run used (its training manifest plus its held-out photos); None if unknown."""
    from core.learning import bundles

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
    from core.learning import extraction

    then_signature, seed = run.extra.get("labels_signature"), 0
    if then_signature is None:  # a run from before runs kept it: the plan it was trained with
        path = project.path("runs", "split_plan.json")
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        then_signature, seed = stored.get("signature"), int(stored.get("plan", {}).get("seed", 0))
    y, ids = extraction.training_labels(project, run.backbone_id)
    if evaluation_signature(ids, list(y), seed) == then_signature:
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


def tagging_model(project: Project) -> dict | None:
    """The model chosen for tagging (an entry of :func:`core.learning.predict.list_models`): the
    analyst's choice, else the comparison's recommendation, else the latest trained one."""
    from core.learning.predict import list_models

    models = list_models(project)
    if not models:
        return None
    by_id = {m["id"]: m for m in models}
    chosen = project.get_meta("tagging_model")
    if chosen in by_id:
        return by_id[chosen]
    runs = latest_runs(project)
    comparison = compare(project) if len(runs) == 2 else None
    kind = "finetuned" if comparison is not None and comparison.recommended.lower().startswith("fine") else "frozen"
    run = runs.get(kind) or next(iter(runs.values()), None)
    return by_id.get(run.id) if run is not None and run.id in by_id else models[0]
