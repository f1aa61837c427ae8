"""Fine-tuning a pretrained network on the project's photos.

Plain functions in the style of torchvision's reference ``train.py``: :func:`train_one_epoch`
and :func:`evaluate` take everything they use as arguments, and :func:`finetune` wires them
together. The recipe is the one that works on tens to thousands of photos:

* start from the frozen-backbone head when there is one (:func:`init_head_from_frozen`):
  the network begins exactly at the linear probe's predictions ("LP-FT");
* progressive unfreezing: the head alone first, then the last blocks, then everything,
  with smaller learning rates for earlier layers (layer-wise decay), each group warming up
  when it is unfrozen, all following one cosine decay per step;
* AdamW, label smoothing, gradient clipping, mild augmentation that keeps the label;
* the best epoch by validation loss is kept (the starting linear probe counts as a
  candidate) and restored at the end, so fine-tuning never returns something worse on the
  validation photos than where it started.

Probabilities always have one column per class in sorted class order, as everywhere in
:mod:`core.learning.evaluation`. Torch is imported inside the functions so that importing this
module (e.g. for :class:`FinetuneConfig`) stays cheap.
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

from core.vision import backbones as _bb
from core.vision.device import cpu_cores, pick_device

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CHECKPOINT_FILE",
    "FinetuneConfig",
    "FinetuneResult",
    "PhotoDataset",
    "build_train_transform",
    "collate_photos",
    "default_batch_size",
    "evaluate",
    "finetune",
    "init_head_from_frozen",
    "load_finetuned",
    "predict_proba",
    "state_dict_for_bundle",
    "train_one_epoch",
]

TrainItem = tuple[str, "str | os.PathLike[str]", str]  # (photo id, path, class name)
PredictItem = tuple[str, "str | os.PathLike[str]"]  # (photo id, path)

CHECKPOINT_FILE = "finetune-best.safetensors"
# Augmentation strength. Product photos are framed on purpose, so crops stay mild (a
# heavy crop can cut the person out and make the label wrong); no vertical flips or
# rotations (people are upright in catalogs); colour changes small (colour is often part
# of the product, never of the label "person").
TRAIN_CROP_SCALE = (0.7, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
TRAIN_COLOR_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FinetuneConfig:
    """How a network is fine-tuned. The defaults suit a few hundred photos on a laptop CPU.

    Epochs ``< head_only_epochs`` train the head alone (a linear probe on fixed features);
    the next ``partial_epochs`` also train the last ``partial_groups`` groups of the
    backbone; after that everything trains. Backbone group ``g`` (counted from the top)
    learns at ``lr_backbone * layer_decay ** g``. Early stopping counts only epochs where
    everything trains. ``max_train_seconds`` stops cleanly after the batch that crosses it.

    ``train_bn_stats=False`` keeps every BatchNorm layer on its pretrained statistics
    (its scale and shift still train), as Keras' and detectron2's fine-tuning recipes do
    for small data: measured on the product photos, unfreezing the top blocks with batch
    statistics of 16 photos threw the linear probe's training loss from 0.30 to 0.59.
    """

    epochs: int = 8
    batch_size: int | None = None  # None: by device (default_batch_size)
    lr_head: float = 1e-3
    lr_backbone: float = 2e-4
    layer_decay: float = 0.75
    head_only_epochs: int = 1
    partial_epochs: int = 1
    partial_groups: int = 2
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    patience: int = 3
    min_delta: float = 1e-4
    class_weight: str | None = "balanced"  # as the frozen head: a rare class is not ignored
    train_bn_stats: bool = False
    seed: int = 0
    amp: bool | None = None  # None: mixed precision on CUDA, full precision elsewhere
    num_workers: int | None = None  # None: sensible for this machine
    max_train_seconds: float | None = None

    def __post_init__(self) -> None:
        def check(name: str, value, *, allow_zero: bool = False) -> None:
            ok = value is not None and (value >= 0 if allow_zero else value > 0)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                need = "zero or more" if allow_zero else "more than zero"
                raise ValueError(f"Fine-tuning setting {name} must be {need}, got {value!r}.")

        check("epochs", self.epochs)
        check("lr_head", self.lr_head)
        check("lr_backbone", self.lr_backbone, allow_zero=True)
        check("weight_decay", self.weight_decay, allow_zero=True)
        check("warmup_epochs", self.warmup_epochs, allow_zero=True)
        check("head_only_epochs", self.head_only_epochs, allow_zero=True)
        check("partial_epochs", self.partial_epochs, allow_zero=True)
        check("partial_groups", self.partial_groups, allow_zero=True)
        check("patience", self.patience)
        check("min_delta", self.min_delta, allow_zero=True)
        if self.batch_size is not None:
            check("batch_size", self.batch_size)
        if self.grad_clip is not None:
            check("grad_clip", self.grad_clip)
        if self.max_train_seconds is not None:
            check("max_train_seconds", self.max_train_seconds)
        if self.num_workers is not None:
            check("num_workers", self.num_workers, allow_zero=True)
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"Fine-tuning setting layer_decay must be in (0, 1], got {self.layer_decay!r}.")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"Fine-tuning setting label_smoothing must be in [0, 1), got {self.label_smoothing!r}.")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}.")


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


# --------------------------------------------------------------------------- data


class PhotoDataset:
    """Map-style dataset over ``(photo id, path, class index)`` for DataLoader workers.

    An item is ``(position, tensor, class index, None)``, or ``(position, None, class index,
    reason)`` when the photo cannot be read: one bad photo never stops a run.
    """

    def __init__(self, items: Sequence[tuple[str, Any, int]], transform: Callable, *, load_size: int):
        self.items = list(items)
        self.transform = transform
        self.load_size = load_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from core.inputs.images import load_for_model

        _, path, target = self.items[index]
        try:
            return index, self.transform(load_for_model(path, size=self.load_size)), target, None
        except Exception as exc:  # noqa: BLE001 - any failure becomes a reason, not a crash
            return index, None, target, _reason(exc)


def _reason(exc: Exception) -> str:
    from core.inputs.images import ImageError

    if isinstance(exc, ImageError):
        return str(exc)
    return f"the photo could not be prepared for the network ({type(exc).__name__}: {exc})"


def collate_photos(samples) -> dict[str, Any]:
    """Stack the readable photos of a batch; keep the others as ``failures``."""
    import torch

    ok = [s for s in samples if s[1] is not None]
    return {
        "index": [s[0] for s in ok],
        "x": torch.stack([s[1] for s in ok]) if ok else None,
        "y": torch.tensor([s[2] for s in ok], dtype=torch.long),
        "failures": [(s[0], s[3]) for s in samples if s[1] is None],
    }


def _seed_worker(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding workers must not fight the network for cores
    seed = torch.initial_seed() % 2**32  # the DataLoader's per-worker seed, from its generator
    np.random.seed(seed)
    random.seed(seed)


def _loader(items, transform, *, load_size: int, batch_size: int, device, workers: int,
            shuffle: bool = False, seed: int = 0, drop_last: bool = False):
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        PhotoDataset(items, transform, load_size=load_size),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_photos,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker if workers else None,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def build_train_transform(backbone_id: str) -> Callable:
    """The training augmentation for a backbone: PIL RGB image → normalised tensor.

    Size, interpolation, mean and std come from the backbone's own preprocessing; on top of
    it a mild random crop, a horizontal flip and small colour changes, none of which can
    change whether a person is in the photo.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    p = _bb.get_backbone(backbone_id).preprocessing
    return v2.Compose([
        v2.RandomResizedCrop(
            p.crop_size, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO,
            interpolation=InterpolationMode(p.interpolation), antialias=True,
        ),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(**TRAIN_COLOR_JITTER),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ])


# --------------------------------------------------------------------------- device helpers


def default_batch_size(device: str | torch.device | None = None) -> int:
    """Training batch size per device. On a CPU, 8: measured on 2 cores (Lite0, whole
    network training) 8 photos per step ran at ~43 photos/s, 16 at ~31, 32 at ~18 (large
    batches fall out of the CPU caches). BatchNorm statistics stay frozen by default, so
    small batches cost nothing there; with ``train_bn_stats`` use 16 or more."""
    dev = pick_device(device)
    return {"cuda": 64, "mps": 32}.get(dev.type, 8)


def _default_workers(device) -> int:
    # Same policy as feature extraction: on a 2-core CPU a loader process takes a core from
    # the network (measured slower); elsewhere a few, leaving cores to the main process.
    cores = cpu_cores()
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return max(0, min(8, cores - 1))


def _amp_dtype(device, amp: bool | None):
    import torch

    if device.type != "cuda" or amp is False:
        return None  # CPU autocast is slower than float32 on most laptops
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@contextlib.contextmanager
def _compute_settings(device, workers: int):
    """CPU threads left to the network by the loader workers; cuDNN autotuning on CUDA
    (the input size never changes). Both restored afterwards."""
    import torch

    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if device.type == "cpu" and workers:
        torch.set_num_threads(max(1, cpu_cores() - workers))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = bench


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


# --------------------------------------------------------------------------- head initialisation


def init_head_from_frozen(model: nn.Module, head_arrays: Mapping[str, np.ndarray], classes: Sequence[str]) -> None:
    """Give ``model.head`` the fitted frozen head's decision function, so training starts at
    the frozen model's predictions (linear probe, then fine-tune).

    ``head_arrays`` come from :func:`core.learning.heads.head_to_arrays` and ``classes`` are the
    frozen head's classes in its own order; the network's rows follow sorted class order.
    The StandardScaler is folded into the Linear layer (``W' = W / scale``,
    ``b' = b - W' · mean``); a two-class logistic regression (one row ``z``) becomes the
    logits ``[-z/2, z/2]``, whose softmax equals its probabilities.
    """
    import torch

    classes = [str(c) for c in classes]
    k, head = len(classes), model.head
    if len(set(classes)) != k or head.out_features != k:
        raise ValueError(
            f"The network has {head.out_features} outputs but the frozen head has classes {classes}."
        )
    try:
        mean = np.asarray(head_arrays["scaler.mean"], dtype=np.float64)
        scale = np.asarray(head_arrays["scaler.scale"], dtype=np.float64)
        coef = np.asarray(head_arrays["logreg.coef"], dtype=np.float64)
        intercept = np.asarray(head_arrays["logreg.intercept"], dtype=np.float64).ravel()
    except KeyError as exc:
        raise ValueError(f"The frozen head's arrays lack {exc}; pass the output of head_to_arrays.") from exc
    d = head.in_features
    if mean.shape != (d,) or scale.shape != (d,):
        raise ValueError(
            f"The frozen head was fitted on {mean.shape[0] if mean.ndim == 1 else '?'}-dimensional "
            f"features but this network gives {d}: it belongs to another backbone."
        )
    if k == 2 and coef.shape == (1, d) and intercept.shape == (1,):
        w = np.vstack([-coef[0] / 2, coef[0] / 2])
        b = np.array([-intercept[0] / 2, intercept[0] / 2])
    elif coef.shape == (k, d) and intercept.shape == (k,):
        w, b = coef, intercept
    else:
        raise ValueError(f"The frozen head's weights {coef.shape} do not fit {k} classes and {d} features.")
    w = w / scale
    b = b - w @ mean
    order = [classes.index(c) for c in sorted(classes)]
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w[order]).to(head.weight))
        head.bias.copy_(torch.from_numpy(b[order]).to(head.bias))


# --------------------------------------------------------------------------- parameter groups


def _depth_groups(features: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters in groups from the input (first) to the output (last).

    timm models describe their own stages (``group_matcher``); for the others a group is a
    run of parameters sharing the module path up to its first numbered part (``layer3``,
    ``features.4``, ``encoder_layer_7``), which is a stage or block in torchvision's models.
    """
    inner = getattr(features, "model", None)
    if inner is not None and callable(getattr(inner, "group_matcher", None)):
        from timm.models import group_parameters

        params = dict(inner.named_parameters())
        grouped = group_parameters(inner, inner.group_matcher(coarse=True))
        groups = [[(f"model.{n}", params[n]) for n in names if n in params] for names in grouped.values()]
        return [g for g in groups if g]
    runs: list[tuple[str, list]] = []
    for name, param in features.named_parameters():
        key_parts = []
        for part in name.split(".")[:-1]:
            key_parts.append(part)
            if any(ch.isdigit() for ch in part):
                break
        key = ".".join(key_parts)
        if runs and runs[-1][0] == key:
            runs[-1][1].append((name, param))
        else:
            runs.append((key, [(name, param)]))
    return [params for _, params in runs]


def _param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the head, then the backbone from the top down, each with its
    learning rate and the epoch it starts training; no weight decay on biases and norms."""
    depth = _depth_groups(model.features)
    n = len(depth)
    full_epoch = config.head_only_epochs + config.partial_epochs
    groups: list[dict[str, Any]] = []

    def add(named, *, name: str, lr: float, start: int) -> None:
        decay = [p for _, p in named if p.ndim > 1]
        no_decay = [p for _, p in named if p.ndim <= 1]
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": name, "start_epoch": start})

    add(list(model.head.named_parameters()), name="head", lr=config.lr_head, start=0)
    for rank, named in enumerate(reversed(depth)):  # rank 0 = the group next to the head
        start = config.head_only_epochs if rank < config.partial_groups else full_epoch
        add(named, name=f"backbone.{n - 1 - rank}", lr=config.lr_backbone * config.layer_decay**rank, start=start)
    return groups


class _WarmupCosine:
    """LR factor per step for one parameter group: zero until its start epoch, a linear
    warm-up from then, all under one cosine decay over the whole run."""

    def __init__(self, start_step: int, warmup_steps: int, total_steps: int):
        self.start_step, self.warmup_steps, self.total_steps = start_step, warmup_steps, max(1, total_steps)

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        warm = min(1.0, (step - self.start_step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def _make_scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int, *, at_step: int = 0):
    import torch

    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    lambdas = [_WarmupCosine(g["start_epoch"] * steps_per_epoch, warmup, total) for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    if at_step:  # rebuilt mid-run (smaller batches after running out of memory)
        scheduler.last_epoch = at_step
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
            group["lr"] = base * fn(at_step)
    return scheduler


def _set_trainable(model: nn.Module, optimizer, epoch: int, *, train_bn_stats: bool = False) -> str:
    """Unfreeze the groups whose start epoch has come. Frozen parts run in eval mode, so
    their BatchNorm statistics stay those of the pretrained network; with
    ``train_bn_stats=False`` so do those of the trained parts. Returns the phase."""
    from torch import nn

    backbone_on = []
    for group in optimizer.param_groups:
        on = epoch >= group["start_epoch"]
        for p in group["params"]:
            p.requires_grad_(on)
        if group["name"] != "head":
            backbone_on.append(on)
    model.train()
    if not any(backbone_on):
        model.features.eval()
        return "head"
    for module in model.features.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (
            train_bn_stats and any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            module.eval()
    return "all" if all(backbone_on) else "top"


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    *,
    device: torch.device,
    scaler=None,
    amp_dtype=None,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    grad_clip: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """One pass over ``loader`` (batches from :func:`collate_photos`), stepping the
    optimizer and the per-step scheduler after every batch.

    ``should_cancel()`` is checked before each batch and ``deadline`` (a
    ``time.perf_counter()`` value) after each; either ends the epoch early, said by
    ``interrupted`` (``"cancelled"`` / ``"time_budget"``). Returns the mean training loss
    and accuracy (on augmented photos), photos seen, unreadable photos (dataset positions
    with reasons), seconds and photos per second.
    """
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, failures, interrupted = 0, [], None
    total = len(loader)
    for i, batch in enumerate(loader):
        if should_cancel is not None and should_cancel():
            interrupted = "cancelled"
            break
        failures.extend(batch["failures"])
        if batch["x"] is not None:
            x = batch["x"].to(device, non_blocking=True, memory_format=torch.channels_last)
            y = batch["y"].to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()
            n = len(y)
            loss_sum += loss.detach() * n  # stays on the device: no sync per batch
            correct += (logits.detach().argmax(1) == y).sum()
            seen += n
        scheduler.step()  # a batch of unreadable photos still counts, so the schedule keeps its length
        if on_batch is not None:
            on_batch(i + 1, total)
        if deadline is not None and time.perf_counter() >= deadline:
            interrupted = "time_budget"
            break
    seconds = time.perf_counter() - started
    return {
        "loss": float(loss_sum) / seen if seen else float("nan"),
        "accuracy": float(correct) / seen if seen else float("nan"),
        "n": seen,
        "failures": failures,
        "interrupted": interrupted,
        "seconds": seconds,
        "photos_per_s": seen / seconds if seconds > 0 else 0.0,
    }


def evaluate(model: nn.Module, loader, *, device: torch.device, amp_dtype=None,
             on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Probabilities (columns in sorted class order) for every readable photo of ``loader``
    with the plain cross-entropy loss and accuracy (NaN when the photos have no labels).

    ``model`` must already be on ``device``; it runs in eval mode. Returns ``proba``
    (float64), ``ids``, ``index`` (positions in the dataset), ``targets``, ``loss``,
    ``accuracy``, ``n`` and ``failures`` (dataset positions with reasons).
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    items = loader.dataset.items
    probas, index, targets, failures = [], [], [], []
    loss_sum, total = 0.0, len(loader)
    try:
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                failures.extend(batch["failures"])
                if batch["x"] is not None:
                    x = batch["x"].to(device, non_blocking=True, memory_format=torch.channels_last)
                    with _autocast(device, amp_dtype):
                        logits = model(x).float()
                    y = batch["y"]
                    if (y >= 0).all():
                        loss_sum += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
                    probas.append(torch.softmax(logits, dim=1).double().cpu().numpy())
                    index.extend(batch["index"])
                    targets.extend(y.tolist())
                if on_batch is not None:
                    on_batch(i + 1, total)
    finally:
        model.train(was_training)
    n = len(index)
    k = model.head.out_features
    proba = np.concatenate(probas) if probas else np.empty((0, k))
    y = np.asarray(targets, dtype=np.int64)
    labelled = n > 0 and bool((y >= 0).all())
    return {
        "loss": loss_sum / n if labelled else float("nan"),
        "accuracy": float((proba.argmax(1) == y).mean()) if labelled else float("nan"),
        "proba": proba,
        "ids": [str(items[i][0]) for i in index],
        "index": index,
        "targets": y,
        "n": n,
        "failures": failures,
    }


# --------------------------------------------------------------------------- the run


def _sorted_classes(classes: Sequence[str]) -> list[str]:
    out = sorted({str(c) for c in classes})
    if len(out) < 2:
        raise ValueError(f"Fine-tuning needs at least two labels, got {out}.")
    return out


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

    from core.learning.evaluation import choose_threshold

    started = time.perf_counter()
    config = config or FinetuneConfig()
    classes = _sorted_classes(classes)
    train_items = _indexed(items_train, classes, "training")
    val_items = _indexed(items_val, classes, "validation")
    if positive is not None and positive not in classes:
        raise ValueError(f"The positive label {positive!r} is not one of {classes}.")
    dev = pick_device(device)
    amp_dtype = _amp_dtype(dev, config.amp)
    batch_size = config.batch_size or default_batch_size(dev)
    workers = _default_workers(dev) if config.num_workers is None else config.num_workers
    prep = _bb.get_backbone(backbone_id).preprocessing
    train_tf, eval_tf = build_train_transform(backbone_id), _bb.build_transform(backbone_id)
    deadline = started + config.max_train_seconds if config.max_train_seconds else None
    full_epoch = config.head_only_epochs + config.partial_epochs

    def loaders(bs: int):
        train = _loader(train_items, train_tf, load_size=prep.resize_size, batch_size=bs, device=dev,
                        workers=workers, shuffle=True, seed=config.seed, drop_last=len(train_items) > bs)
        val = _loader(val_items, eval_tf, load_size=prep.resize_size, batch_size=bs, device=dev, workers=workers)
        return train, val

    failures: dict[str, str] = {}

    def note(items, found) -> None:
        for pos, reason in found:
            failures.setdefault(items[pos][0], reason)

    with _seeded(config.seed, dev), _compute_settings(dev, workers):
        model = _bb.build_classifier_model(backbone_id, len(classes))
        if head_arrays is not None:
            init_head_from_frozen(model, head_arrays, head_classes if head_classes is not None else classes)
        model = model.to(dev, memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(_param_groups(model, config), fused=dev.type == "cuda")
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        weights = None
        if config.class_weight == "balanced":
            weights = torch.tensor(_balanced_weights(train_items, classes), dtype=torch.float32, device=dev)
        train_loader, val_loader = loaders(batch_size)
        scheduler = _make_scheduler(optimizer, config, len(train_loader))

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
            phase = _set_trainable(model, optimizer, epoch, train_bn_stats=config.train_bn_stats)
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
                if not _is_oom(exc) or batch_size == 1:
                    raise
                stats = None  # the memory is freed once the exception (and its frames) is gone
            if stats is None:
                # Out of memory: halve the batch and redo this epoch (weights already
                # updated in it are kept), with the schedule at the same point of the run.
                optimizer.zero_grad(set_to_none=True)
                _empty_cache(dev)
                batch_size //= 2
                train_loader, val_loader = loaders(batch_size)
                scheduler = _make_scheduler(optimizer, config, len(train_loader), at_step=epoch * len(train_loader))
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


# --------------------------------------------------------------------------- using the network


def predict_proba(
    model: nn.Module,
    items: Sequence[PredictItem],
    *,
    backbone_id: str,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_failure: Callable[[str, str], None] | None = None,
) -> np.ndarray:
    """Class probabilities (``(len(items), n_classes)``, sorted class order) of a fine-tuned
    network for ``(photo id, path)`` pairs, through the backbone's evaluation transform.

    No row is dropped: a photo that cannot be read gets a row of NaN and
    ``on_failure(photo id, reason)``. The model is moved to ``device`` (in place).
    """
    import torch

    dev = pick_device(device)
    items = [(str(i), Path(p), -1) for i, p in items]
    k = model.head.out_features
    out = np.full((len(items), k), np.nan)
    if not items:
        return out
    workers = _default_workers(dev) if num_workers is None else num_workers
    bs = batch_size or default_batch_size(dev)
    prep = _bb.get_backbone(backbone_id).preprocessing
    loader = _loader(items, _bb.build_transform(backbone_id), load_size=prep.resize_size,
                     batch_size=bs, device=dev, workers=workers)
    model.to(dev, memory_format=torch.channels_last)
    with _compute_settings(dev, workers):
        ev = evaluate(model, loader, device=dev, amp_dtype=_amp_dtype(dev, None), on_batch=on_progress)
    del loader
    if ev["index"]:
        out[ev["index"]] = ev["proba"]
    if on_failure is not None:
        for pos, reason in ev["failures"]:
            on_failure(items[pos][0], reason)
    return out


def state_dict_for_bundle(model: nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights as contiguous CPU tensors that share no memory, ready for
    ``safetensors.torch.save_file`` (and :func:`core.learning.bundles.save_bundle`)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def load_finetuned(backbone_id: str, classes: Sequence[str], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a fine-tuned network (eval mode, CPU) from :func:`state_dict_for_bundle`
    output. Every tensor must fit exactly; no pretrained weights are needed."""
    classes = _sorted_classes(classes)
    model = _bb.build_classifier_model(backbone_id, len(classes), pretrained=False)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"These weights do not fit a fine-tuned {backbone_id} with {len(classes)} labels: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()
