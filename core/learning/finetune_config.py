"""How a network is fine-tuned: the settings, the augmentation, the schedule, the start.

The recipe is the one that works on tens to thousands of photos: start from the frozen
head (:func:`init_head_from_frozen`, "LP-FT"); progressive unfreezing (the head alone,
then the last blocks, then everything) with smaller learning rates for earlier layers
(:func:`param_groups`), each group warming up when it is unfrozen under one cosine decay
per step (:func:`make_scheduler`); mild augmentation that keeps the label
(:func:`build_train_transform`). The loop itself is :mod:`core.learning.finetune_loop`,
the run :mod:`core.learning.finetune`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.vision.backbones import get_backbone
from core.vision.device import pick_device

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = [
    "DEFAULT_LENGTH", "LENGTHS", "FinetuneConfig", "build_train_transform", "config_for_length", "default_batch_size",
    "depth_groups", "estimate_seconds", "init_head_from_frozen", "make_scheduler", "param_groups", "seconds_per_photo",
    "set_trainable",
]

# Augmentation strength. Product photos are framed on purpose, so crops stay mild (a
# heavy crop can cut the person out and make the label wrong); no vertical flips or
# rotations (people are upright in catalogs); colour changes small (colour is often part
# of the product, never of the label "person").
TRAIN_CROP_SCALE = (0.7, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
NEVER = 10**9  # the start epoch of groups that never train (frozen_groups)
TRAIN_COLOR_JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}


@dataclass(frozen=True)
class FinetuneConfig:
    """How a network is fine-tuned. The defaults suit a few hundred photos on a laptop CPU.

    Epochs ``< head_only_epochs`` train the head alone (a linear probe on fixed features);
    the next ``partial_epochs`` also train the last ``partial_groups`` groups of the
    backbone; after that everything trains. Backbone group ``g`` (counted from the top)
    learns at ``lr_backbone * layer_decay ** g``. Early stopping counts only epochs where
    everything trains. ``max_train_seconds`` stops cleanly after the batch that crosses it.

    The first ``frozen_groups`` groups from the input never train: they hold 0.5 % of the
    weights (generic edge and colour filters which, under ``layer_decay``, learn at a tenth of
    the top's rate) but work at full resolution. Lite0, 2-core CPU: a step of 8 photos took
    3.2 s with them and 1.6 s without on a loaded machine (load ~24); on an idle one the
    saving is smaller (the round where everything trains: 17.1 s → 15.3 s for 336 photos).
    Freezing one or two groups more is 1.22x / 1.38x faster again per step, but it cost
    balanced accuracy on the everyday photos (8 epochs, 5 outer folds): 94.6 % with 3,
    93.3 % with 4, 91.4 % with 5.

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
    frozen_groups: int = 3
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
        check("frozen_groups", self.frozen_groups, allow_zero=True)
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


# How long fine-tuning may run, as the user chooses it: the most rounds (passes over the
# training photos; early stopping can end sooner). "quick" is the shortest full recipe:
# one round each for the classifier alone, the last layers, and everything.
LENGTHS = {"quick": 3, "thorough": 8}
DEFAULT_LENGTH = "thorough"

# A training step (forward, backward, update) costs this many forward passes per photo:
# measured on the 2-core CPU with EfficientNet-Lite0, batch 8, channels_last, 4.15x
# (textbook: backward ~2x forward, plus the optimizer). Used only until a fine-tuning run
# on this computer has measured its own speed.
TRAIN_STEP_VS_FORWARD = 4.0


def config_for_length(length: str | None = None, *, seed: int = 0) -> FinetuneConfig:
    """The settings for a fine-tuning length ("quick" or "thorough"; None: the default)."""
    length = length or DEFAULT_LENGTH
    if length not in LENGTHS:
        raise ValueError(f"Fine-tuning length must be one of {sorted(LENGTHS)}, got {length!r}.")
    return FinetuneConfig(epochs=LENGTHS[length], seed=seed)


def seconds_per_photo(history: Sequence[Mapping[str, Any]] | None = None,
                      forward_photos_per_s: float | None = None) -> tuple[float, bool] | None:
    """Seconds one training photo costs on this computer, and whether it was measured by
    fine-tuning itself: the median over an earlier run's rounds (``history`` of a
    :class:`core.learning.finetune.FinetuneResult`) in which the network trained (those
    where only the classifier trained ran forward passes: they count
    :data:`TRAIN_STEP_VS_FORWARD` times), else the measured feature-extraction speed
    (photos per second) made that many times slower; None when neither is known."""
    for phases, factor in ((("all", "top"), 1.0), (("head",), TRAIN_STEP_VS_FORWARD)):
        rates = [float(h["photos_per_s"]) for h in history or ()
                 if h.get("phase") in phases and (h.get("photos_per_s") or 0) > 0]
        if rates:
            return float(np.median([factor / r for r in rates])), True
    if forward_photos_per_s and forward_photos_per_s > 0:
        return TRAIN_STEP_VS_FORWARD / forward_photos_per_s, False
    return None


def estimate_seconds(config: FinetuneConfig, *, n_train: int, n_val: int, photo_seconds: float) -> float:
    """How long fine-tuning runs at most with ``config``, if one training photo costs
    ``photo_seconds``: rounds where only the classifier trains cost a forward pass per
    photo, the others a full step; the validation photos are scored after every round
    and once at the start (a forward pass each)."""
    forward = photo_seconds / TRAIN_STEP_VS_FORWARD
    head_rounds = min(config.epochs, config.head_only_epochs)
    train = head_rounds * n_train * forward + (config.epochs - head_rounds) * n_train * photo_seconds
    return train + (config.epochs + 1) * n_val * forward


def build_train_transform(backbone_id: str) -> Callable:
    """The training augmentation for a backbone: PIL RGB image → normalised tensor.

    Size, interpolation, mean and std come from the backbone's own preprocessing; on top of
    it a mild random crop, a horizontal flip and small colour changes, none of which can
    change whether a person is in the photo.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    p = get_backbone(backbone_id).preprocessing
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


def default_batch_size(device: str | torch.device | None = None) -> int:
    """Training batch size per device. On a CPU, 8, for accuracy rather than speed. Measured on
    2 idle cores (Lite0, the round where everything trains, fused AdamW), 16 photos per step
    train at 30-32 photos/s against 25-27 for 8; but on the everyday photos (5 outer folds,
    8 epochs, seeds 0 and 1) the faster recipes lost balanced accuracy: 94.6 / 94.4 % at
    batch 8, 93.4 / 91.2 % at 16 (learning rate x1.41, 4 groups frozen), 95.7 / 87.2 % at 16
    with 192 px training crops. BatchNorm statistics stay frozen by default, so small
    batches cost nothing there; with ``train_bn_stats`` use 16 or more."""
    dev = pick_device(device)
    return {"cuda": 64, "mps": 32}.get(dev.type, 8)


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


def depth_groups(features: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
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


def param_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the head, then the backbone from the top down, each with its
    learning rate and the epoch it starts training; no weight decay on biases and norms."""
    depth = depth_groups(model.features)
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
        if rank >= n - config.frozen_groups:
            start = NEVER
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


def make_scheduler(optimizer, config: FinetuneConfig, steps_per_epoch: int, *, at_step: int = 0):
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


def set_trainable(model: nn.Module, optimizer, epoch: int, *, train_bn_stats: bool = False) -> str:
    """Unfreeze the groups whose start epoch has come. Frozen parts run in eval mode, so
    their BatchNorm statistics stay those of the pretrained network; with
    ``train_bn_stats=False`` so do those of the trained parts. Returns the phase."""
    from torch import nn

    backbone_on = []
    for group in optimizer.param_groups:
        on = epoch >= group["start_epoch"]
        for p in group["params"]:
            p.requires_grad_(on)
        if group["name"] != "head" and group["start_epoch"] < NEVER:
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
