"""Fine-tuning a pretrained network on a project's photos: one run, start to finish.

:func:`finetune` wires the settings (:mod:`core.learning.finetune_config`) and the loop
(:mod:`core.learning.finetune_loop`) together on the best device: it starts from the
frozen head when there is one, trains with AdamW, label smoothing and gradient clipping,
halves the batch when the device runs out of memory, stops early, and keeps the best
epoch by validation loss (the starting linear probe counts as a candidate), restored at
the end, so fine-tuning never returns something worse on the validation photos than
where it started. With a ``checkpoint_dir`` every completed epoch is saved
(:mod:`core.learning.finetune_checkpoint`) and the same run asked again continues there.

The steps: :func:`_prepare`, :func:`_build_state`, :func:`_resume` or
:func:`_measure_start`, :func:`_run_epochs` (:func:`_train_epoch`, :func:`_record_epoch`,
:func:`_save`), :func:`_restore_best`, :func:`_result`. Torch is imported inside the
functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.learning.evaluation import choose_threshold
from core.learning.finetune_checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    remove_checkpoint,
    request_fingerprint,
    restore_rng,
    save_checkpoint,
)
from core.learning.finetune_config import (
    FinetuneConfig,
    build_train_transform,
    default_batch_size,
    init_head_from_frozen,
    make_scheduler,
    param_groups,
    set_trainable,
)
from core.learning.finetune_loop import evaluate, frozen_parts_fast, inference_copy, sorted_classes, train_one_epoch
from core.vision.backbones import get_backbone
from core.vision.device import compute_settings, default_workers, empty_cache, is_oom, mixed_precision, pick_device
from core.vision.networks import build_classifier_model, build_transform
from core.vision.photos import PhotoDataset, make_loader

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = ["CHECKPOINT_FILE", "FinetuneResult", "finetune"]

TrainItem = tuple[str, "str | os.PathLike[str]", str]  # (photo id, path, class name)
Indexed = tuple[str, Path, int]  # (photo id, path, class index)

log = logging.getLogger(__name__)

# Decoded photos kept in memory between epochs, all loaders together: ~2,000 photos at the load
# size of 256 px. Decoding one at that size took 0.7 ms from a 224 px catalog JPEG, 11 ms from a
# 12-megapixel JPEG (2-core CPU).
KEEP_DECODED_BYTES = 512 * 2**20


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
    resumed_epochs: int = 0  # epochs taken from a checkpoint of an interrupted run (0: started anew)
    checkpoint_note: str | None = None  # why a checkpoint found in checkpoint_dir was not used


@contextlib.contextmanager
def _seeded(seed: int, device):
    """Seed python, numpy and torch for a reproducible run, then give the caller's random
    states back (a server process runs other work too)."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _indexed(items: Sequence[TrainItem], classes: list[str], what: str) -> list[Indexed]:
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


def _balanced_weights(items: list[Indexed], classes: list[str]) -> np.ndarray:
    counts = np.bincount([t for _, _, t in items], minlength=len(classes))
    missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if missing:
        raise ValueError(f"The training photos include none labelled {missing}; every label needs training photos.")
    return counts.sum() / (len(classes) * counts)


def _note(failures: dict[str, str], items: list[Indexed], found) -> None:
    for pos, reason, *_ in found:
        failures.setdefault(items[pos][0], reason)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class _Run:
    """What a run was asked, checked and resolved; the same for a fresh and a resumed run."""

    backbone_id: str
    classes: list[str]
    train_items: list[Indexed]
    val_items: list[Indexed]
    config: FinetuneConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    workers: int
    positive: str | None  # the label the threshold is for (two classes only)
    fingerprint: str  # what a checkpoint must have been written for to be used


@dataclass
class _State:
    """Everything that changes while training: what a checkpoint holds."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    class_weights: torch.Tensor | None
    batch_size: int
    train_loader: Any
    val_loader: Any
    best_state: dict[str, torch.Tensor]
    clock: float  # perf_counter() at which the run started, counting earlier processes of a resumed run
    epoch: int = 0  # the next epoch to train
    history: list[dict[str, Any]] = field(default_factory=list)
    bad_epochs: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # photo id -> reason
    start_val: dict[str, float] | None = None
    best_loss: float = math.inf
    best_epoch: int = -1
    best_eval: dict[str, Any] | None = None


def _prepare(items_train, items_val, *, backbone_id, classes, config, positive, device, head_arrays,
             head_classes) -> _Run:
    """Check what was asked (plain errors) and resolve the defaults: device, precision, workers."""
    classes = sorted_classes(classes)
    train_items = _indexed(items_train, classes, "training")
    val_items = _indexed(items_val, classes, "validation")
    if positive is not None and positive not in classes:
        raise ValueError(f"The positive label {positive!r} is not one of {classes}.")
    dev = pick_device(device)
    fingerprint = request_fingerprint(
        backbone_id=backbone_id, classes=classes, train_items=train_items, val_items=val_items, config=config,
        head_arrays=head_arrays, head_classes=head_classes, device_type=dev.type,
    )
    return _Run(
        backbone_id=backbone_id, classes=classes, train_items=train_items, val_items=val_items, config=config,
        device=dev, amp_dtype=mixed_precision(dev, config.amp),
        workers=default_workers(dev) if config.num_workers is None else config.num_workers,
        positive=(positive or classes[1]) if len(classes) == 2 else None, fingerprint=fingerprint,
    )


def _loaders(run: _Run, batch_size: int):
    """The training loader (shuffled and augmented per epoch) and the validation loader. Each
    keeps decoded photos for the next epoch, up to :data:`KEEP_DECODED_BYTES` in all."""
    load_size = get_backbone(run.backbone_id).preprocessing.resize_size
    keep = KEEP_DECODED_BYTES // (2 * max(1, run.workers))  # each worker process keeps its own
    augment = build_train_transform(run.backbone_id)
    train = make_loader(PhotoDataset(run.train_items, augment, load_size=load_size, keep_decoded=keep),
                        batch_size=batch_size, device=run.device, workers=run.workers, shuffle=True,
                        seed=run.config.seed, drop_last=len(run.train_items) > batch_size, persistent=True)
    val = make_loader(PhotoDataset(run.val_items, build_transform(run.backbone_id), load_size=load_size,
                                   keep_decoded=keep),
                      batch_size=batch_size, device=run.device, workers=run.workers, persistent=True)
    return train, val


def _build_state(run: _Run, head_arrays, head_classes, *, started: float) -> _State:
    """The run at its start: the network (with the frozen head's decision function when
    there is one), AdamW, the schedule, the loaders."""
    import torch

    config, dev = run.config, run.device
    model = build_classifier_model(run.backbone_id, len(run.classes))
    if head_arrays is not None:
        init_head_from_frozen(model, head_arrays, head_classes if head_classes is not None else run.classes)
    model = model.to(dev, memory_format=torch.channels_last)
    # The fused update: one kernel for all parameters (a CPU step of Lite0's top stages: 19 → 5 ms).
    optimizer = torch.optim.AdamW(param_groups(model, config), fused=dev.type in ("cuda", "cpu"))
    weights = None
    if config.class_weight == "balanced":
        weights = torch.tensor(_balanced_weights(run.train_items, run.classes), dtype=torch.float32, device=dev)
    batch_size = config.batch_size or default_batch_size(dev)
    train_loader, val_loader = _loaders(run, batch_size)
    return _State(
        model=model, optimizer=optimizer, scheduler=make_scheduler(optimizer, config, len(train_loader)),
        scaler=torch.amp.GradScaler("cuda") if run.amp_dtype == torch.float16 else None, class_weights=weights,
        batch_size=batch_size, train_loader=train_loader, val_loader=val_loader, best_state=_cpu_state(model),
        clock=started,
    )


def _measure_start(run: _Run, state: _State) -> None:
    """Score the starting network (the linear probe): a candidate for the best."""
    ev = _validate(run, state)
    state.start_val = {"val_loss": ev["loss"], "val_acc": ev["accuracy"]}
    if math.isfinite(ev["loss"]):
        state.best_loss, state.best_eval = ev["loss"], ev


def _validate(run: _Run, state: _State) -> dict[str, Any]:
    """The network scored on the validation photos, through a faster copy (same probabilities)."""
    fast = inference_copy(state.model, backbone_id=run.backbone_id, device=run.device)
    ev = evaluate(fast, state.val_loader, device=run.device, amp_dtype=run.amp_dtype)
    _note(state.failures, run.val_items, ev["failures"])
    return ev


def _resume(run: _Run, state: _State, checkpoint: Checkpoint, *, started: float) -> None:
    """Put the run where an interrupted one left it: weights, optimizer, schedule, batch
    size, best so far, history, counters and random states."""
    progress = checkpoint.progress
    state.model.load_state_dict(checkpoint.model)
    state.optimizer.load_state_dict(checkpoint.optimizer)
    if state.scaler is not None and checkpoint.scaler:
        state.scaler.load_state_dict(checkpoint.scaler)
    if progress["batch_size"] != state.batch_size:  # halved after running out of memory
        state.batch_size = progress["batch_size"]
        state.train_loader, state.val_loader = _loaders(run, state.batch_size)
    state.scheduler = make_scheduler(state.optimizer, run.config, len(state.train_loader),
                                     at_step=checkpoint.scheduler_step)
    state.best_state = checkpoint.best_state if checkpoint.best_state is not None else checkpoint.model
    state.best_loss, state.best_epoch = progress["best_loss"], progress["best_epoch"]
    state.best_eval = checkpoint.best_eval
    state.epoch, state.history, state.bad_epochs = progress["epoch"], progress["history"], progress["bad_epochs"]
    state.failures, state.start_val = dict(progress["failures"]), progress["start_val"]
    state.clock = started - progress["seconds"]
    restore_rng(checkpoint, run.device)


def _train_epoch(run: _Run, state: _State, *, on_progress, should_cancel, deadline) -> dict[str, Any]:
    """Train epoch ``state.epoch``. When the device runs out of memory the batch is halved
    and the epoch redone (weights already updated in it are kept), with the schedule at the
    same point of the run."""
    import torch

    epoch, epochs = state.epoch, run.config.epochs
    while True:
        state.train_loader.sampler.set_epoch(epoch)
        steps = len(state.train_loader)

        def on_batch(done: int, total: int, _steps=steps) -> None:
            if on_progress is not None:
                on_progress(epoch * _steps + done, epochs * _steps)

        try:
            with frozen_parts_fast(state.model, backbone_id=run.backbone_id, device=run.device):
                return train_one_epoch(
                    state.model, state.train_loader, state.optimizer, state.scheduler, device=run.device,
                    scaler=state.scaler, amp_dtype=run.amp_dtype, label_smoothing=run.config.label_smoothing,
                    class_weights=state.class_weights, grad_clip=run.config.grad_clip, on_batch=on_batch,
                    should_cancel=should_cancel, deadline=deadline,
                )
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_oom(exc) or state.batch_size == 1:
                raise
        # the memory is freed here, once the exception (and its frames) is gone
        state.optimizer.zero_grad(set_to_none=True)
        empty_cache(run.device)
        state.batch_size //= 2
        state.train_loader, state.val_loader = _loaders(run, state.batch_size)
        state.scheduler = make_scheduler(state.optimizer, run.config, len(state.train_loader),
                                         at_step=epoch * len(state.train_loader))


def _record_epoch(run: _Run, state: _State, stats: dict[str, Any], *, phase: str, started: float,
                  on_epoch) -> None:
    """Score the trained epoch on the validation photos, add it to the history, keep the
    network if it is the best so far, count epochs without progress; on to the next."""
    config = run.config
    ev = _validate(run, state)
    record = {
        "epoch": state.epoch,
        "train_loss": stats["loss"],
        "train_acc": stats["accuracy"],
        "val_loss": ev["loss"],
        "val_acc": ev["accuracy"],
        "lr": float(state.optimizer.param_groups[0]["lr"]),
        "seconds": time.perf_counter() - started,
        "phase": phase,
        "photos_per_s": stats["photos_per_s"],
    }
    state.history.append(record)
    if on_epoch is not None:
        on_epoch(dict(record))
    if ev["loss"] < state.best_loss - config.min_delta:
        state.best_state, state.best_eval = _cpu_state(state.model), ev
        state.best_loss, state.best_epoch, state.bad_epochs = ev["loss"], state.epoch, 0
    elif state.epoch >= config.head_only_epochs + config.partial_epochs:  # partly frozen epochs warm up by design
        state.bad_epochs += 1
    state.epoch += 1


def _save(run: _Run, state: _State, folder: Path) -> None:
    """Checkpoint the run at the end of an epoch."""
    best_is_model = state.best_epoch == state.epoch - 1  # the epoch just trained is the best: store it once
    progress = {
        "epoch": state.epoch, "history": state.history, "bad_epochs": state.bad_epochs,
        "batch_size": state.batch_size, "failures": state.failures, "start_val": state.start_val,
        "best_loss": state.best_loss, "best_epoch": state.best_epoch, "seconds": time.perf_counter() - state.clock,
    }
    save_checkpoint(folder, fingerprint=run.fingerprint, progress=progress, model=state.model,
                    best_state=None if best_is_model else state.best_state, best_eval=state.best_eval,
                    optimizer=state.optimizer, scheduler_step=state.scheduler.last_epoch, scaler=state.scaler,
                    device=run.device)


def _run_epochs(run: _Run, state: _State, *, checkpoint_dir: Path | None, on_epoch, on_progress,
                should_cancel) -> str:
    """Train epoch after epoch; return why it stopped: ``"completed"``,
    ``"early_stopping"``, ``"time_budget"`` or ``"cancelled"``. Every completed epoch
    that leaves more to do is checkpointed."""
    config = run.config
    deadline = state.clock + config.max_train_seconds if config.max_train_seconds else None
    while state.epoch < config.epochs:
        if deadline is not None and time.perf_counter() >= deadline:
            return "time_budget"
        started = time.perf_counter()
        phase = set_trainable(state.model, state.optimizer, state.epoch, train_bn_stats=config.train_bn_stats)
        stats = _train_epoch(run, state, on_progress=on_progress, should_cancel=should_cancel, deadline=deadline)
        _note(state.failures, run.train_items, stats["failures"])
        if stats["interrupted"] == "cancelled":
            return "cancelled"
        _record_epoch(run, state, stats, phase=phase, started=started, on_epoch=on_epoch)
        if stats["interrupted"] == "time_budget":
            return "time_budget"
        if state.bad_epochs >= config.patience and state.epoch < config.epochs:
            return "early_stopping"
        if checkpoint_dir is not None and state.epoch < config.epochs:
            _save(run, state, checkpoint_dir)
    return "completed"


def _restore_best(state: _State) -> None:
    state.train_loader = state.val_loader = None  # stops worker processes now
    state.model.load_state_dict(state.best_state)
    state.model.requires_grad_(True)
    state.model.eval()


def _result(run: _Run, state: _State, stop_reason: str, *, seconds: float, resumed_epochs: int,
            checkpoint_note: str | None) -> FinetuneResult:
    """The result, with the decision threshold chosen on the best network's validation
    probabilities (two classes; 0.5 when there are none)."""
    classes, best_eval = run.classes, state.best_eval
    threshold = None
    if len(classes) == 2:
        threshold = 0.5
        if best_eval is not None:
            k = classes.index(run.positive)
            threshold = choose_threshold(best_eval["targets"] == k, best_eval["proba"][:, k])
    return FinetuneResult(
        model=state.model,
        classes=classes,
        history=state.history,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_loss,
        stopped_early=stop_reason == "early_stopping",
        cancelled=stop_reason == "cancelled",
        stop_reason=stop_reason,
        seconds=seconds,
        failures=sorted(state.failures.items()),
        device=str(run.device),
        batch_size=state.batch_size,
        start_val=state.start_val,
        val_ids=list(best_eval["ids"]) if best_eval is not None else [],
        val_proba=best_eval["proba"] if best_eval is not None else None,
        positive=run.positive,
        threshold=threshold,
        resumed_epochs=resumed_epochs,
        checkpoint_note=checkpoint_note,
    )


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

    With ``checkpoint_dir`` the run is saved there after every completed epoch, and a
    checkpoint there from a run asked exactly the same (photos, labels, settings, starting
    head, kind of device) is continued: on the CPU the result is bit for bit the one an
    uninterrupted run gives, and ``on_epoch`` first receives the epochs already done. A
    cancelled run keeps its checkpoint; a finished one removes it. A checkpoint of another
    request is not used and ``checkpoint_note`` says so. ``max_train_seconds`` counts the
    time of the earlier, interrupted attempts too.
    """
    started = time.perf_counter()
    config = config or FinetuneConfig()
    run = _prepare(items_train, items_val, backbone_id=backbone_id, classes=classes, config=config,
                   positive=positive, device=device, head_arrays=head_arrays, head_classes=head_classes)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    checkpoint, note = load_checkpoint(folder, run.fingerprint) if folder is not None else (None, None)
    if note:
        log.warning(note)
    resumed_epochs = 0
    with _seeded(config.seed, run.device), compute_settings(run.device, workers=run.workers):
        state = _build_state(run, head_arrays, head_classes, started=started)
        if checkpoint is not None:
            try:
                _resume(run, state, checkpoint, started=started)
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # e.g. written by another library version
                checkpoint, note = None, f"The saved fine-tuning state could not be used ({exc}); started over."
                log.warning(note)
                _seed_all(config.seed)  # exactly as a fresh run
                state = _build_state(run, head_arrays, head_classes, started=started)
        if checkpoint is not None:
            resumed_epochs = state.epoch
            log.info("Fine-tuning continues at epoch %d of %d from %s.", state.epoch + 1, config.epochs, folder)
            for record in state.history if on_epoch is not None else ():
                on_epoch(dict(record))
        elif head_arrays is not None:
            _measure_start(run, state)
        stop_reason = _run_epochs(run, state, checkpoint_dir=folder, on_epoch=on_epoch, on_progress=on_progress,
                                  should_cancel=should_cancel)
        _restore_best(state)
    if folder is not None and stop_reason != "cancelled":
        remove_checkpoint(folder)
    return _result(run, state, stop_reason, seconds=time.perf_counter() - state.clock,
                   resumed_epochs=resumed_epochs, checkpoint_note=note)
