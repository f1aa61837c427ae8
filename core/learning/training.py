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
    calibration,
    comparison,
    crossval,
    evaluation,
    extraction,
    finetune,
    finetune_config,
    finetune_loop,
    groups,
    heads,
    novelty,
    runs,
    splits,
)
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import backbones, weights
from core.vision.device import pick_device

__all__ = ["compare", "finetune_estimates", "threshold_effect", "train_finetuned", "train_frozen", "what_is_learned"]

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
    grouping: groups.Grouping


def _training_data(project: Project, backbone_id: str | None, seed: int) -> _TrainingData:
    backbone_id = backbone_id or ProjectState(project).backbone or backbones.DEFAULT_BACKBONE_ID
    X, y, ids = extraction.load_training_features(project, backbone_id)
    if len(ids) == 0:
        raise InputError("No photo has features yet: extract them on the Backbone step first.")
    classes = sorted(set(y))
    if len(classes) < 2:
        raise InputError("Training needs at least two classes of labelled photos.")
    names = project.class_names()
    grouping = groups.photo_grouping(project, ids, X)
    plan = runs.split_plan(project, ids, list(y), seed=seed, groups=grouping.groups, group_source=grouping.source)
    return _TrainingData(backbone_id, X, y, ids, classes, names, _positive(classes, names), plan, grouping)


def train_frozen(
    project: Project,
    *,
    backbone_id: str | None = None,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> runs.RunRecord:
    """Cross-validate and fit the frozen-backbone classifier on the cached features."""
    job_started = time.time()
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
    unlike = _novelty(X, y, ids, list(cv.classes), plan.train_ids + plan.val_ids, plan.test_ids, seed)
    bundle = bundles.ModelBundle(
        kind="frozen",
        backbone_id=backbone_id,
        weights_hash=weights.weights_hash(backbone_id),
        preprocessing=backbones.preprocessing_record(backbone_id),
        classes=list(cv.classes),
        class_display_names={c: names[c] for c in cv.classes if c in names},
        positive=cv.positive,
        threshold=cv.threshold,
        metrics={"test": cv.test_report.to_dict(), "cv": cv.summary, "reliability": cv.reliability,
                 "novelty": unlike.summary()},
        calibration=cv.calibration,
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
        seconds=round(time.time() - job_started, 1), created_at=time.time(),  # what the user waited for
        extra={"cv": cv.to_dict(), "cv_seconds": round(seconds, 2), "fit_seconds": round(cv.fit_seconds, 3),
               "labels_signature": runs.labels_signature(ids, list(y), 0),
               "reliability": cv.reliability, "split": groups.split_record(plan, data.grouping)},
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
    length: str | None = None,
    device: str | None = None,
    on_progress: Progress | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> runs.RunRecord | None:
    """Fine-tune the backbone on the plan's training photos, early-stop on its validation
    photos, and score it on the same held-out photos as the frozen head.

    ``length`` ("quick" or "thorough", :data:`core.learning.finetune_config.LENGTHS`)
    sets how many rounds at most when no ``config`` is given. The new head starts from a
    frozen head fit on the training photos only (a linear probe, so the validation photos
    stay honest). When no round beats that start, the fine-tuned network is given the
    quick model's own classifier and threshold: it then is the quick model (same answers,
    same score), as its story says. Returns None when cancelled before anything useful
    was learned. A run that was cancelled or whose process died continues from its last
    completed round when asked again with the same photos, labels and settings (the
    checkpoint is kept in the project's ``runs/finetune-checkpoint``).
    """
    job_started = time.time()
    report = on_progress or (lambda d, t, m: None)
    data = _training_data(project, backbone_id, seed)
    backbone_id, X, y, ids, classes, names, positive, plan = (
        data.backbone_id, data.X, data.y, data.ids, data.classes, data.names, data.positive, data.plan)
    label = dict(zip(ids, y))
    row = {sha: i for i, sha in enumerate(ids)}
    train_rows = [row[i] for i in plan.train_ids]
    probe = heads.make_frozen_head(random_state=seed).fit(X[train_rows], y[train_rows])
    items = lambda part: [(sha, project.image_path(sha), label[sha]) for sha in part]  # noqa: E731
    config = config or finetune_config.config_for_length(length, seed=seed)
    started = time.time()
    result = finetune.finetune(
        items(plan.train_ids), items(plan.val_ids), backbone_id=backbone_id, classes=classes,
        config=config, head_arrays=heads.head_to_arrays(probe),
        head_classes=list(probe.classes_), positive=positive, device=device, on_epoch=on_epoch,
        on_progress=lambda done, total: report(done, total, _round_message(done, total, config.epochs)),
        should_cancel=should_cancel, checkpoint_dir=project.path("runs", "finetune-checkpoint"),
    )
    if result.cancelled and result.best_epoch < 0:
        return None
    earlier_attempts = max(0.0, result.seconds - (time.time() - started))  # a resumed run's earlier processes
    threshold, quick = result.threshold, None
    if result.best_epoch < 0:
        quick = _quick_model_on(project, data)
        if quick is not None:  # the start is kept: make it the quick model itself, not a cousin fit on fewer photos
            finetune_config.init_head_from_frozen(result.model, quick[1], quick[0].classes)
            threshold = quick[0].threshold
    report(0, len(plan.test_ids), "Scoring the held-out photos")
    test_items = [(sha, project.image_path(sha)) for sha in plan.test_ids]
    raw = finetune_loop.predict_proba(result.model, test_items, backbone_id=backbone_id, device=device)
    keep = ~np.isnan(raw).any(axis=1)
    test_ids = [sha for sha, ok in zip(plan.test_ids, keep) if ok]
    truth = [label[i] for i in test_ids]
    if quick is not None:  # the quick model's own confidence calibration goes with its head
        cal = calibration.Calibration.from_dict(quick[0].calibration) if quick[0].calibration else None
    else:
        cal, threshold = _calibrate_on_validation(result, label, classes, positive, seed)
    proba = calibration.apply_calibration(raw, cal)
    test_report = evaluation.evaluate_predictions(
        truth, proba[keep], classes=classes, positive=positive, threshold=threshold,
    )
    rel = {"before": calibration.reliability(truth, raw[keep], classes=classes, positive=positive,
                                             threshold=result.threshold),
           "after": calibration.reliability(truth, proba[keep], classes=classes, positive=positive,
                                            threshold=threshold)}
    seconds = time.time() - job_started + earlier_attempts  # what the user waited for
    unlike = _novelty(X, y, ids, classes, plan.train_ids, plan.test_ids, seed)
    bundle = bundles.ModelBundle(
        kind="finetuned", backbone_id=backbone_id, weights_hash=weights.weights_hash(backbone_id),
        preprocessing=backbones.preprocessing_record(backbone_id), classes=classes,
        class_display_names={c: names[c] for c in classes if c in names}, positive=positive,
        threshold=threshold, metrics={"test": test_report.to_dict(), "history": result.history, "reliability": rel,
                                      "novelty": unlike.summary()},
        calibration=cal.to_dict() if cal else None, seed=seed, split=plan.to_dict(),
        # the photos it learned from: trained on, and chosen and calibrated on (all but the held-out ones)
        training_manifest=bundles.training_manifest(plan.train_ids + plan.val_ids,
                                                    [label[i] for i in plan.train_ids + plan.val_ids]),
        name=f"{project.name} · fine-tuned {backbones.get_backbone(backbone_id).name}",
    )
    path = bundles.save_bundle(bundle, unlike.to_arrays(), project.path("models", f"{bundle.id}.zip"),
                               network=finetune_loop.state_dict_for_bundle(result.model))
    acc = test_report.balanced_accuracy
    record = runs.RunRecord(
        id=bundle.id, kind="finetuned", backbone_id=backbone_id, bundle_path=str(path), classes=classes,
        positive=positive, threshold=threshold, test_ids=test_ids, test_report=test_report.to_dict(),
        headline=f"Balanced accuracy {100 * acc.value:.1f} % on {test_report.n} held-out photos. "
                 + _story(result, quick_kept=quick is not None),
        seconds=round(seconds, 1), created_at=time.time(),
        extra={"history": result.history, "best_epoch": result.best_epoch, "failures": len(result.failures),
               "resumed_epochs": result.resumed_epochs, "quick_model_kept": quick[0].id if quick else None,
               "length": length, "rounds": config.epochs, "train_photos": len(plan.train_ids),
               "val_photos": len(plan.val_ids),
               "labels_signature": runs.labels_signature(ids, list(y), 0),
               "device": str(result.device), "reliability": rel, "split": groups.split_record(plan, data.grouping)},
    )
    runs.save_run(project, record, {"test_ids": np.asarray(test_ids), "test_proba": proba[keep]})
    return record


def _round_message(done: int, total: int, rounds: int) -> str:
    """The progress line of fine-tuning: which round it is in (the bar counts its steps)."""
    if total <= 0:
        return "Fine-tuning"
    current = min(rounds, done * rounds // total + 1)
    return f"Fine-tuning, round {current} of {rounds}"


def _quick_model_on(project: Project, data: _TrainingData) -> tuple[bundles.ModelBundle, dict] | None:
    """The latest quick model, with its head arrays, if it was trained on exactly these
    labelled photos with this backbone and split (else None)."""
    run = runs.latest_runs(project).get("frozen")
    if run is None or run.backbone_id != data.backbone_id:
        return None
    if run.extra.get("labels_signature") != runs.labels_signature(data.ids, list(data.y), 0):
        return None
    try:
        bundle, arrays = bundles.load_bundle(run.bundle_path)
    except (OSError, ValueError):
        return None
    plan = data.plan
    same_split = all(list(bundle.split.get(k, [])) == list(getattr(plan, k)) for k in ("train_ids", "val_ids", "test_ids"))
    if not same_split or set(bundle.classes) != set(data.classes):
        return None
    return bundle, arrays


def finetune_estimates(project: Project, *, device: str | None = None) -> dict | None:
    """Before fine-tuning: for each length ("quick", "thorough") the most rounds and about
    how many seconds it takes on this computer, and whether the speed behind it was
    measured by fine-tuning here (else derived from the feature-extraction speed).
    None until the quick model exists (fine-tuning starts from it) or no speed is known."""
    latest = runs.latest_runs(project)
    quick = latest.get("frozen")
    if quick is None:
        return None
    try:
        split = bundles.load_bundle(quick.bundle_path)[0].split
    except (OSError, ValueError):
        return None
    n_train, n_val = len(split.get("train_ids", [])), len(split.get("val_ids", []))
    backbone_id = quick.backbone_id
    device_type = pick_device(device).type
    earlier = latest.get("finetuned")
    history = None
    if earlier is not None and earlier.backbone_id == backbone_id and \
            str(earlier.extra.get("device", "")).split(":")[0] == device_type:
        history = earlier.extra.get("history")
    last = ProjectState(project).last_extraction
    # the project's own extraction counts photo decoding too, as training does
    forward = last.get("photos_per_s") if last.get("backbone") == backbone_id else None
    forward = forward or extraction.known_speed(backbone_id, device=device)
    speed = finetune_config.seconds_per_photo(history, forward)
    if speed is None or not n_train:
        return None
    photo_seconds, measured = speed
    lengths = {}
    for name, rounds in finetune_config.LENGTHS.items():
        config = finetune_config.config_for_length(name)
        lengths[name] = {"rounds": rounds, "seconds": finetune_config.estimate_seconds(
            config, n_train=n_train, n_val=n_val, photo_seconds=photo_seconds)}
    return {"lengths": lengths, "measured": measured, "train_photos": n_train, "val_photos": n_val}


def _calibrate_on_validation(result, label: dict, classes: list[str], positive: str | None, seed: int):
    """The fine-tuned network's calibration, fitted on its validation photos (the test photos
    stay unseen), and its threshold re-chosen on the calibrated probabilities."""
    if result.val_proba is None or not len(result.val_ids):
        return None, result.threshold
    ok = ~np.isnan(result.val_proba).any(axis=1)
    val_proba = result.val_proba[ok]
    truth = [label[i] for i, good in zip(result.val_ids, ok) if good]
    cal = calibration.fit_calibration(truth, val_proba, classes=classes, positive=positive,
                                      fitted_on="validation photos", seed=seed)
    if cal is None or positive is None:
        return cal, result.threshold
    return cal, evaluation.choose_threshold(truth, cal.apply(val_proba)[:, classes.index(positive)], positive=positive)


def _novelty(X: np.ndarray, y: np.ndarray, ids: list[str], classes: list[str], train_ids: list[str],
             held_out_ids: list[str], seed: int) -> novelty.Novelty:
    """What the model learned from (the training photos' features and labels), with the limits
    of "unlike them" (all of them, and those of each class) calibrated on the held-out photos:
    kept in the model file."""
    row = {sha: i for i, sha in enumerate(ids)}
    train = [row[i] for i in train_ids]
    held_out = [row[i] for i in held_out_ids if i in row]
    return novelty.fit_novelty(X[train], X[held_out], y_train=y[train], y_held_out=y[held_out], classes=classes,
                               seed=seed)


def _story(result, *, quick_kept: bool = False) -> str:
    """How a fine-tuning run went, in one plain sentence."""
    n = len(result.history)
    rounds = f"{n} round{'' if n == 1 else 's'}"
    how = {"completed": f"Trained for all {rounds}",
           "early_stopping": f"Stopped after {rounds}, once it no longer improved",
           "time_budget": f"Stopped after {rounds} at the time limit",
           "cancelled": f"Cancelled after {rounds}"}.get(result.stop_reason, f"Trained for {rounds}")
    if result.resumed_epochs:
        done = result.resumed_epochs
        how += f" (continued after an interruption, {done} round{'' if done == 1 else 's'} already done)"
    if result.best_epoch >= 0:
        return f"{how}; the version kept is the one from round {result.best_epoch + 1}."
    if quick_kept:
        return (f"{how}; no round beat its starting point, so it keeps the quick model's classifier and "
                "confidence setting unchanged: the same answers as the quick model.")
    return (f"{how}; no round beat its starting point (a quick classifier fitted on the training photos alone), "
            "so that is what is kept.")


def compare(project: Project, *, names: tuple[str, str] = ("Frozen", "Fine-tuned")) -> comparison.Comparison | None:
    """Frozen vs fine-tuned on the same held-out photos, once both exist (``names`` word the verdict);
    None while they were scored on different photos (one was trained before the split changed)."""
    latest = runs.latest_runs(project)
    if "frozen" not in latest or "finetuned" not in latest:
        return None
    a, b = latest["frozen"], latest["finetuned"]
    _, pa = runs.load_run(project, a.id)
    _, pb = runs.load_run(project, b.id)
    ids = [str(i) for i in pa["test_ids"]]
    if not set(ids) <= {str(i) for i in pb["test_ids"]}:
        return None  # scored on other photos (the split changed since): no fair comparison until retrained
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
