"""Fine-tuning a pretrained network on a project's photos: one run, start to finish.

:func:`finetune` wires the settings (:mod:`core.learning.finetune_config`) and the loop
(:mod:`core.learning.finetune_loop`) together on the best device: it starts from the
frozen head when there is one, trains with AdamW, label smoothing and gradient clipping,
halves the batch when the device runs out of memory, stops early, and keeps the best
epoch by validation loss (the starting linear probe counts as a candidate), restored at
the end, so fine-tuning never returns something worse on the validation photos than
where it started. Torch is imported inside the functions so that importing this module
stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.learning.evaluation import choose_threshold
from core.learning.finetune_config import (
    FinetuneConfig,
    build_train_transform,
    default_batch_size,
    init_head_from_frozen,
    make_scheduler,
    param_groups,
    set_trainable,
)
from core.learning.finetune_loop import evaluate, sorted_classes, train_one_epoch
from core.vision.backbones import get_backbone
from core.vision.device import compute_settings, default_workers, empty_cache, is_oom, mixed_precision, pick_device
from core.vision.networks import build_classifier_model, build_transform
from core.vision.photos import PhotoDataset, make_loader

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = ["CHECKPOINT_FILE", "FinetuneResult", "finetune"]

TrainItem = tuple[str, "str | os.PathLike[str]", str]  # (photo id, path, class name)

CHECKPOINT_FILE = "finetune-best.safetensors"


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced. ``model`` holds the best weights (eval mode, on
    ``device``); ``best_epoch`` is ``-1`` when no epoch beat the starting model (the linear
    probe from the frozen head, or the untrained network after an early cancel)."""

    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    cancelled: bool
    stop_reason: str  # "completed", "early_stopping", "time_budget" or "cancelled"
    seconds: float
    failures: list[tuple[str, str]]  # (photo id, plain reason) of photos that could not be read
    device: str
    batch_size: int
    start_val: dict[str, float] | None = None  # val loss/accuracy of the starting model, if measured
    val_ids: list[str] = field(default_factory=list)
    val_proba: np.ndarray | None = None  # the best model's validation probabilities
    positive: str | None = None
    threshold: float | None = None  # chosen on the validation photos (two classes only)


@contextlib.contextmanager
def _seeded(seed: int, device):
    """Seed python, numpy and torch for a reproducible run, then give the caller's random
    states back (a server process runs other work too)."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _indexed(items: Sequence[TrainItem], classes: list[str], what: str) -> list[tuple[str, Path, int]]:
    index = {c: i for i, c in enumerate(classes)}
    out, unknown = [], set()
    for photo_id, path, label in items:
        if str(label) not in index:
            unknown.add(str(label))
            continue
        out.append((str(photo_id), Path(path), index[str(label)]))
    if unknown:
        raise ValueError(f"The {what} photos have labels {sorted(unknown)} that are not among the classes {classes}.")
    if not out:
        raise ValueError(f"There are no {what} photos: fine-tuning needs both training and validation photos.")
    return out


def _balanced_weights(items: list[tuple[str, Path, int]], classes: list[str]) -> np.ndarray:
    counts = np.bincount([t for _, _, t in items], minlength=len(classes))
    missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if missing:
        raise ValueError(f"The training photos include none labelled {missing}; every label needs training photos.")
    return counts.sum() / (len(classes) * counts)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_checkpoint(folder: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write the best weights with safetensors (never pickle), atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    tmp = folder / f".{CHECKPOINT_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def finetune(
    items_train: Sequence[TrainItem],
    items_val: Sequence[TrainItem],
    *,
    backbone_id: str,
    classes: Sequence[str],
    config: FinetuneConfig | None = None,
    head_arrays: Mapping[str, np.ndarray] | None = None,
    head_classes: Sequence[str] | None = None,
    positive: str | None = None,
    device: str | torch.device | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    checkpoint_dir: Path | None = None,
) -> FinetuneResult:
    """Fine-tune the backbone's pretrained network on ``items_train`` ((photo id, path,
    label) triples), early-stopping on ``items_val``; return the best network.

    With ``head_arrays`` (:func:`core.learning.heads.head_to_arrays` of the frozen head, whose
    classes are ``head_classes``, default the sorted ``classes``) training starts from the
    frozen model's predictions; fit that head without the validation photos, or the
    starting model's validation loss, a candidate for the best, is flattering.
    ``on_epoch(record)`` receives each epoch's ``epoch,
    train_loss, train_acc, val_loss, val_acc, lr, seconds`` (and ``phase``,
    ``photos_per_s``); ``on_progress(done, total)`` counts training batches;
    ``should_cancel()`` is checked between batches and leaves the best model so far.
    For two classes the decision threshold on ``positive`` (default the second class) is
    chosen on the validation photos. Reproducible for a given seed on the CPU; on a GPU
    close but not bit for bit.
    """
    import torch

    started = time.perf_counter()
    config = config or FinetuneConfig()
    classes = sorted_classes(classes)
    train_items = _indexed(items_train, classes, "training")
    val_items = _indexed(items_val, classes, "validation")
    if positive is not None and positive not in classes:
        raise ValueError(f"The positive label {positive!r} is not one of {classes}.")
    dev = pick_device(device)
    amp_dtype = mixed_precision(dev, config.amp)
    batch_size = config.batch_size or default_batch_size(dev)
    workers = default_workers(dev) if config.num_workers is None else config.num_workers
    prep = get_backbone(backbone_id).preprocessing
    train_tf, eval_tf = build_train_transform(backbone_id), build_transform(backbone_id)
    deadline = started + config.max_train_seconds if config.max_train_seconds else None
    full_epoch = config.head_only_epochs + config.partial_epochs

    def loaders(bs: int):
        train = make_loader(PhotoDataset(train_items, train_tf, load_size=prep.resize_size), batch_size=bs, device=dev,
                            workers=workers, shuffle=True, seed=config.seed, drop_last=len(train_items) > bs,
                            persistent=True)
        val = make_loader(PhotoDataset(val_items, eval_tf, load_size=prep.resize_size), batch_size=bs, device=dev,
                          workers=workers, persistent=True)
        return train, val

    failures: dict[str, str] = {}

    def note(items, found) -> None:
        for pos, reason, *_ in found:
            failures.setdefault(items[pos][0], reason)

    with _seeded(config.seed, dev), compute_settings(dev, workers=workers):
        model = build_classifier_model(backbone_id, len(classes))
        if head_arrays is not None:
            init_head_from_frozen(model, head_arrays, head_classes if head_classes is not None else classes)
        model = model.to(dev, memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(param_groups(model, config), fused=dev.type == "cuda")
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        weights = None
        if config.class_weight == "balanced":
            weights = torch.tensor(_balanced_weights(train_items, classes), dtype=torch.float32, device=dev)
        train_loader, val_loader = loaders(batch_size)
        scheduler = make_scheduler(optimizer, config, len(train_loader))

        best_state, best_loss, best_epoch, best_eval = _cpu_state(model), math.inf, -1, None
        start_val = None
        if head_arrays is not None:  # the linear probe is a candidate too
            ev = evaluate(model, val_loader, device=dev, amp_dtype=amp_dtype)
            note(val_items, ev["failures"])
            start_val = {"val_loss": ev["loss"], "val_acc": ev["accuracy"]}
            if math.isfinite(ev["loss"]):
                best_loss, best_eval = ev["loss"], ev

        history: list[dict[str, Any]] = []
        stop_reason, bad_epochs, epoch = "completed", 0, 0
        while epoch < config.epochs:
            if deadline is not None and time.perf_counter() >= deadline:
                stop_reason = "time_budget"
                break
            epoch_started = time.perf_counter()
            phase = set_trainable(model, optimizer, epoch, train_bn_stats=config.train_bn_stats)
            steps = len(train_loader)
            done_before = epoch * steps

            def on_batch(done: int, total: int, _before=done_before, _steps=steps) -> None:
                if on_progress is not None:
                    on_progress(_before + done, config.epochs * _steps)

            try:
                stats = train_one_epoch(
                    model, train_loader, optimizer, scheduler, device=dev, scaler=scaler, amp_dtype=amp_dtype,
                    label_smoothing=config.label_smoothing, class_weights=weights, grad_clip=config.grad_clip,
                    on_batch=on_batch, should_cancel=should_cancel, deadline=deadline,
                )
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_oom(exc) or batch_size == 1:
                    raise
                stats = None  # the memory is freed once the exception (and its frames) is gone
            if stats is None:
                # Out of memory: halve the batch and redo this epoch (weights already
                # updated in it are kept), with the schedule at the same point of the run.
                optimizer.zero_grad(set_to_none=True)
                empty_cache(dev)
                batch_size //= 2
                train_loader, val_loader = loaders(batch_size)
                scheduler = make_scheduler(optimizer, config, len(train_loader), at_step=epoch * len(train_loader))
                continue
            note(train_items, stats["failures"])
            if stats["interrupted"] == "cancelled":
                stop_reason = "cancelled"
                break
            ev = evaluate(model, val_loader, device=dev, amp_dtype=amp_dtype)
            note(val_items, ev["failures"])
            record = {
                "epoch": epoch,
                "train_loss": stats["loss"],
                "train_acc": stats["accuracy"],
                "val_loss": ev["loss"],
                "val_acc": ev["accuracy"],
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - epoch_started,
                "phase": phase,
                "photos_per_s": stats["photos_per_s"],
            }
            history.append(record)
            if on_epoch is not None:
                on_epoch(dict(record))
            if ev["loss"] < best_loss - config.min_delta:
                best_state, best_loss, best_epoch, best_eval, bad_epochs = _cpu_state(model), ev["loss"], epoch, ev, 0
                if checkpoint_dir is not None:
                    _save_checkpoint(Path(checkpoint_dir), best_state, {
                        "backbone_id": backbone_id, "classes": classes, "epoch": epoch, "val_loss": ev["loss"],
                    })
            elif epoch >= full_epoch:  # the partly frozen epochs are warm-up by design
                bad_epochs += 1
            epoch += 1
            if stats["interrupted"] == "time_budget":
                stop_reason = "time_budget"
                break
            if bad_epochs >= config.patience and epoch < config.epochs:
                stop_reason = "early_stopping"
                break
        del train_loader, val_loader  # stops worker processes now

        model.load_state_dict(best_state)
        model.requires_grad_(True)
        model.eval()

    pos_label = positive or (classes[1] if len(classes) == 2 else None)
    threshold = None
    val_ids, val_proba = [], None
    if best_eval is not None:
        val_ids, val_proba = best_eval["ids"], best_eval["proba"]
        if len(classes) == 2:
            truth = best_eval["targets"] == classes.index(pos_label)
            threshold = choose_threshold(truth, val_proba[:, classes.index(pos_label)])
    elif len(classes) == 2:
        threshold = 0.5
    return FinetuneResult(
        model=model,
        classes=classes,
        history=history,
        best_epoch=best_epoch,
        best_val_loss=best_loss,
        stopped_early=stop_reason == "early_stopping",
        cancelled=stop_reason == "cancelled",
        stop_reason=stop_reason,
        seconds=time.perf_counter() - started,
        failures=sorted(failures.items()),
        device=str(dev),
        batch_size=batch_size,
        start_val=start_val,
        val_ids=val_ids,
        val_proba=val_proba,
        positive=pos_label if len(classes) == 2 else None,
        threshold=threshold,
    )
