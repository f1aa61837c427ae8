"""Training for a whole project: the frozen head, fine-tuning, and the honest comparison.

Both methods are scored on the same held-out photos of the project's one split plan
(:func:`core.learning.runs.split_plan`); each finished run is kept by
:mod:`core.learning.runs` and its model, a bundle under ``models/``, is listed by
:mod:`core.learning.models`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.base.problems import InputError
from core.learning import (
    bundles,
    comparison,
    crossval,
    evaluation,
    extraction,
    finetune,
    finetune_config,
    finetune_loop,
    heads,
    novelty,
    runs,
    splits,
)
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import backbones, weights

__all__ = ["compare", "threshold_effect", "train_finetuned", "train_frozen", "what_is_learned"]

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


@dataclass(frozen=True)
class _TrainingData:
    """What both methods learn from: the cached features of the labelled photos and the split plan."""

    backbone_id: str
    X: np.ndarray
    y: np.ndarray
    ids: list[str]
    classes: list[str]
    names: dict[str, str]
    positive: str | None
    plan: splits.SplitPlan


def _training_data(project: Project, backbone_id: str | None, seed: int) -> _TrainingData:
    backbone_id = backbone_id or ProjectState(project).backbone or backbones.DEFAULT_BACKBONE_ID
    X, y, ids = extraction.load_training_features(project, backbone_id)
    if len(ids) == 0:
        raise InputError("No photo has features yet: extract them on the Backbone step first.")
    classes = sorted(set(y))
    if len(classes) < 2:
        raise InputError("Training needs at least two classes of labelled photos.")
    names = project.class_names()
    return _TrainingData(backbone_id, X, y, ids, classes, names, _positive(classes, names),
                         runs.split_plan(project, ids, list(y), seed=seed))


def train_frozen(
    project: Project,
    *,
    backbone_id: str | None = None,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> runs.RunRecord:
    """Cross-validate and fit the frozen-backbone classifier on the cached features."""
    report = on_progress or (lambda d, t, m: None)
    data = _training_data(project, backbone_id, seed)
    backbone_id, X, y, ids, names, positive, plan = (data.backbone_id, data.X, data.y, data.ids, data.names,
                                                     data.positive, data.plan)
    started = time.time()
    cv = crossval.cross_validate_head(
        X, y, plan=plan, ids=ids, positive=positive,
        on_progress=lambda done, total: report(done, total, "Cross-validating the frozen classifier"),
    )
    seconds = time.time() - started
    unlike = _novelty(X, ids, plan.train_ids + plan.val_ids, plan.test_ids, seed)
    bundle = bundles.ModelBundle(
        kind="frozen",
        backbone_id=backbone_id,
        weights_hash=weights.weights_hash(backbone_id),
        preprocessing=backbones.preprocessing_record(backbone_id),
        classes=list(cv.classes),
        class_display_names={c: names[c] for c in cv.classes if c in names},
        positive=cv.positive,
        threshold=cv.threshold,
        metrics={"test": cv.test_report.to_dict(), "cv": cv.summary, "novelty": unlike.summary()},
        seed=seed,
        split=plan.to_dict(),
        training_manifest=bundles.training_manifest(plan.train_ids + plan.val_ids, [dict(zip(ids, y))[i] for i in plan.train_ids + plan.val_ids]),
        name=f"{project.name} · frozen {backbones.get_backbone(backbone_id).name}",
    )
    path = bundles.save_bundle(bundle, {**heads.head_to_arrays(cv.model), **unlike.to_arrays()},
                               project.path("models", f"{bundle.id}.zip"))
    record = runs.RunRecord(
        id=bundle.id, kind="frozen", backbone_id=backbone_id, bundle_path=str(path),
        classes=list(cv.classes), positive=cv.positive, threshold=cv.threshold,
        test_ids=list(cv.test_ids), test_report=cv.test_report.to_dict(), headline=cv.headline(),
        seconds=round(cv.fit_seconds, 3), created_at=time.time(),
        extra={"cv": cv.to_dict(), "cv_seconds": round(seconds, 2),
               "labels_signature": runs.labels_signature(ids, list(y), 0)},
    )
    runs.save_run(project, record, {
        "ids": np.asarray(cv.ids), "oof_proba": cv.oof_proba, "in_test": cv.in_test,
        "test_ids": np.asarray(cv.test_ids), "test_proba": cv.test_proba,
    })
    return record


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
) -> runs.RunRecord | None:
    """Fine-tune the backbone on the plan's training photos, early-stop on its validation
    photos, and score it on the same held-out photos as the frozen head.

    The new head starts from a frozen head fit on the training photos only (a linear
    probe), so fine-tuning starts where the quick model is. Returns None when cancelled
    before anything useful was learned. A run that was cancelled or whose process died
    continues from its last completed epoch when asked again with the same photos, labels
    and settings (the checkpoint is kept in the project's ``runs/finetune-checkpoint``).
    """
    report = on_progress or (lambda d, t, m: None)
    data = _training_data(project, backbone_id, seed)
    backbone_id, X, y, ids, classes, names, positive, plan = (
        data.backbone_id, data.X, data.y, data.ids, data.classes, data.names, data.positive, data.plan)
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
    unlike = _novelty(X, ids, plan.train_ids, plan.test_ids, seed)
    bundle = bundles.ModelBundle(
        kind="finetuned", backbone_id=backbone_id, weights_hash=weights.weights_hash(backbone_id),
        preprocessing=backbones.preprocessing_record(backbone_id), classes=classes,
        class_display_names={c: names[c] for c in classes if c in names}, positive=positive,
        threshold=result.threshold, seed=seed,
        metrics={"test": test_report.to_dict(), "history": result.history, "novelty": unlike.summary()},
        split=plan.to_dict(),
        training_manifest=bundles.training_manifest(plan.train_ids, [label[i] for i in plan.train_ids]),
        name=f"{project.name} · fine-tuned {backbones.get_backbone(backbone_id).name}",
    )
    path = bundles.save_bundle(bundle, unlike.to_arrays(), project.path("models", f"{bundle.id}.zip"),
                               network=finetune_loop.state_dict_for_bundle(result.model))
    acc = test_report.balanced_accuracy
    record = runs.RunRecord(
        id=bundle.id, kind="finetuned", backbone_id=backbone_id, bundle_path=str(path), classes=classes,
        positive=positive, threshold=result.threshold, test_ids=test_ids, test_report=test_report.to_dict(),
        headline=f"Balanced accuracy {100 * acc.value:.1f} % on {test_report.n} held-out photos. " + _story(result),
        seconds=round(seconds, 1), created_at=time.time(),
        extra={"history": result.history, "best_epoch": result.best_epoch, "failures": len(result.failures),
               "resumed_epochs": result.resumed_epochs,
               "labels_signature": runs.labels_signature(ids, list(y), 0),
               "device": str(result.device)},
    )
    runs.save_run(project, record, {"test_ids": np.asarray(test_ids), "test_proba": proba[keep]})
    return record


def _novelty(X: np.ndarray, ids: list[str], train_ids: list[str], held_out_ids: list[str],
             seed: int) -> novelty.Novelty:
    """What the model learned from (the training photos' features), with the limit of "unlike
    them" calibrated on the held-out photos: kept in the model file."""
    row = {sha: i for i, sha in enumerate(ids)}
    return novelty.fit_novelty(X[[row[i] for i in train_ids]], X[[row[i] for i in held_out_ids if i in row]],
                               seed=seed)


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


def compare(project: Project, *, names: tuple[str, str] = ("Frozen", "Fine-tuned")) -> comparison.Comparison | None:
    """Frozen vs fine-tuned on the same held-out photos, once both exist (``names`` word the verdict)."""
    latest = runs.latest_runs(project)
    if "frozen" not in latest or "finetuned" not in latest:
        return None
    a, b = latest["frozen"], latest["finetuned"]
    _, pa = runs.load_run(project, a.id)
    _, pb = runs.load_run(project, b.id)
    ids = [str(i) for i in pa["test_ids"]]
    proba_b = comparison.align_proba(pb["test_proba"], [str(i) for i in pb["test_ids"]], to=ids)
    truth = project.dataset().set_index("sha")["label"]
    return comparison.compare_methods(
        [truth[i] for i in ids], pa["test_proba"], proba_b, classes=a.classes, positive=a.positive,
        threshold_a=a.threshold, threshold_b=b.threshold, cost_a_seconds=a.seconds, cost_b_seconds=b.seconds,
        names=names,
    )


def threshold_effect(project: Project, run: runs.RunRecord, threshold: float) -> dict:
    """What a decision threshold does on the held-out photos, counted in photos (binary only).

    Returns the positive class, how many held-out photos have it, how many of those would
    be missed, how many without it would be wrongly tagged, and the same at the run's own
    threshold for comparison.
    """
    if not run.positive:
        raise ValueError("Thresholds apply to two-class models only.")
    _, arrays = runs.load_run(project, run.id)
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


def what_is_learned(backbone_id: str, kind: str, n_classes: int) -> str:
    """One plain sentence on how many numbers a method learns and how many stay as pretrained."""
    b = backbones.get_backbone(backbone_id)
    head = (b.feature_dim + 1) * (1 if n_classes == 2 else n_classes)
    total = b.params_features
    if kind == "frozen":
        return (f"Learns {head:,} numbers (a small classifier on the {b.feature_dim:,} features); "
                f"the {total / 1e6:.1f} million numbers of {b.name} stay as pretrained.")
    return (f"Learns all {total / 1e6:.1f} million numbers of {b.name} plus a new classifier "
            f"({(b.feature_dim + 1) * n_classes:,} numbers), in three stages: the classifier alone, then the "
            "last layers, then everything, with smaller changes for the earlier layers.")
