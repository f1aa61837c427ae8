"""The fine-tuning loop as plain functions, like torchvision's reference ``train.py``.

:func:`train_one_epoch` and :func:`evaluate` take everything they use as arguments;
:func:`predict_proba` runs a fine-tuned network over photos through the shared photo
loader, never dropping a row; :func:`state_dict_for_bundle` and :func:`load_finetuned`
move a network in and out of a model bundle. Probabilities always have one column per
class in sorted class order, as everywhere in :mod:`core.learning.evaluation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.learning.finetune_config import default_batch_size
from core.vision.backbones import get_backbone
from core.vision.device import autocast, compute_settings, default_workers, mixed_precision, pick_device
from core.vision.fuse import for_inference, frozen_parts_for_inference
from core.vision.networks import build_classifier_model, build_transform
from core.vision.photos import PhotoDataset, make_loader

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = [
    "evaluate", "frozen_parts_fast", "inference_copy", "load_finetuned", "predict_proba", "sorted_classes",
    "state_dict_for_bundle", "train_one_epoch",
]

PredictItem = tuple[str, "str | Path"]  # (photo id, path)


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
            with autocast(device, amp_dtype):
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
                    with autocast(device, amp_dtype):
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


def sorted_classes(classes: Sequence[str]) -> list[str]:
    out = sorted({str(c) for c in classes})
    if len(out) < 2:
        raise ValueError(f"Fine-tuning needs at least two labels, got {out}.")
    return out


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
    workers = default_workers(dev) if num_workers is None else num_workers
    bs = batch_size or default_batch_size(dev)
    prep = get_backbone(backbone_id).preprocessing
    loader = make_loader(PhotoDataset(items, build_transform(backbone_id), load_size=prep.resize_size),
                         batch_size=bs, device=dev, workers=workers)
    model.to(dev, memory_format=torch.channels_last)
    with compute_settings(dev, workers=workers):
        ev = evaluate(inference_copy(model, backbone_id=backbone_id, device=dev), loader, device=dev,
                      amp_dtype=mixed_precision(dev, None), on_batch=on_progress)
    del loader
    if ev["index"]:
        out[ev["index"]] = ev["proba"]
    if on_failure is not None:
        for pos, reason, *_ in ev["failures"]:
            on_failure(items[pos][0], reason)
    return out


def _probe(backbone_id: str, device: torch.device) -> torch.Tensor:
    import torch

    size = get_backbone(backbone_id).input_size
    return torch.randn(2, 3, size, size, device=device)


def inference_copy(model: nn.Module, *, backbone_id: str, device: torch.device) -> nn.Module:
    """``model`` (on ``device``) as a faster copy for scoring photos: BatchNorm folded and, on a
    CPU, padding made static (:func:`core.vision.fuse.for_inference`); the same probabilities.
    ``model`` keeps its mode."""
    was_training = model.training
    fast = for_inference(model.eval(), _probe(backbone_id, device), static_padding=device.type == "cpu")
    model.train(was_training)
    return fast


def frozen_parts_fast(model: nn.Module, *, backbone_id: str, device: torch.device):
    """A context in which the parts of ``model`` that do not train this epoch run as faster
    inference copies (:func:`core.vision.fuse.frozen_parts_for_inference`): the same
    training, less time per step."""
    return frozen_parts_for_inference(model, _probe(backbone_id, device), static_padding=device.type == "cpu")


def state_dict_for_bundle(model: nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights as contiguous CPU tensors that share no memory, ready for
    ``safetensors.torch.save_file`` (and :func:`core.learning.bundles.save_bundle`)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def load_finetuned(backbone_id: str, classes: Sequence[str], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild a fine-tuned network (eval mode, CPU) from :func:`state_dict_for_bundle`
    output. Every tensor must fit exactly; no pretrained weights are needed."""
    classes = sorted_classes(classes)
    model = build_classifier_model(backbone_id, len(classes), pretrained=False)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"These weights do not fit a fine-tuned {backbone_id} with {len(classes)} labels: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval()
