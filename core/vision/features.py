"""Turning photos into feature vectors ("CNN codes"), fast and only once.

:func:`extract_features` runs a backbone over photos on the best device, decoding through
the shared photo loader (:mod:`core.vision.photos`), and stores the result in a
:class:`~core.vision.store.FeatureStore` under :func:`feature_key`, so a photo is never
computed twice for the same network. Results are written in atomic chunks: a cancel or a
crash keeps every finished chunk, and the next run continues from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.inputs.images import load_for_model
from core.vision import backbones, networks, weights
from core.vision.device import compute_settings, default_workers, infer_with_backoff, pick_device
from core.vision.photos import PhotoDataset, decode_jpegs, failure_reason, make_loader
from core.vision.store import FeatureStore
from core.vision.tuning import RunSettings, choose_run_settings

if TYPE_CHECKING:
    import torch


__all__ = ["ExtractionResult", "extract_features", "feature_key"]

_FLUSH_ROWS = 512  # a chunk holds at most this many rows...
_FLUSH_SECONDS = 15.0  # ...or this much work, whichever comes first


def feature_key(backbone_id: str) -> str:
    """The cache key of a backbone's features: id, weights file hash, preprocessing."""
    backbone = backbones.get_backbone(backbone_id)
    return f"{backbone.id}__{weights.weights_hash(backbone)[:12]}__{backbones.preprocessing_key(backbone)}"


@dataclass
class ExtractionResult:
    """What one :func:`extract_features` call did. ``seconds`` is the whole call's wall
    time; ``photos_per_s`` counts computed photos only."""

    key: str
    computed: int
    reused: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    photos_per_s: float = 0.0
    device: str = "cpu"
    batch_size: int = 0
    cancelled: bool = False


class _Buffer:
    """Feature rows waiting to be written as one chunk (by rows or by time, whichever first)."""

    def __init__(self, store: FeatureStore, key: str):
        self.store, self.key = store, key
        self.ids: list[str] = []
        self.rows: list[np.ndarray] = []
        self.since = time.perf_counter()

    def add(self, ids: list[str], rows: np.ndarray) -> None:
        self.ids.extend(ids)
        self.rows.append(rows)
        if len(self.ids) >= _FLUSH_ROWS or time.perf_counter() - self.since >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            self.store.add(self.key, self.ids, np.concatenate(self.rows))
        self.ids, self.rows, self.since = [], [], time.perf_counter()


def extract_features(
    items: Sequence[tuple[str, Path]],
    *,
    backbone_id: str,
    store: FeatureStore,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    fold: bool = True,
) -> ExtractionResult:
    """Compute and store the features of every photo in ``items`` ((sha, path) pairs) that
    the store does not already hold for this backbone.

    A photo that cannot be decoded is reported in ``failed`` with a plain reason and never
    stops the run. ``on_progress(done, total)`` is called at the start (photos already
    stored count as done) and after each batch; ``should_cancel()`` is checked between
    batches, and everything finished before a cancel is kept. ``fold=False`` runs the
    network as published, without folding its BatchNorm layers (for benchmarks). Raises
    :class:`core.vision.weights.WeightsUnavailable` if the weights cannot be had.
    """
    started = time.perf_counter()
    dev = pick_device(device)
    unique: dict[str, Path] = {}
    for sha, path in items:
        unique.setdefault(str(sha), Path(path))
    weights.ensure_weights(backbone_id)  # downloads on first use; WeightsUnavailable otherwise
    key = feature_key(backbone_id)
    stored = store.has(key)
    known_bad = {sha: why for sha, why in store.failures(key).items() if sha in unique}
    todo = [(sha, p, -1) for sha, p in unique.items() if sha not in stored and sha not in known_bad]
    total = len(unique)
    result = ExtractionResult(key=key, computed=0, reused=total - len(todo) - len(known_bad),
                              failed=list(known_bad.items()), device=str(dev))
    if on_progress is not None:
        on_progress(total - len(todo), total)
    if not todo or (should_cancel is not None and should_cancel()):
        result.cancelled = bool(todo)
        result.seconds = time.perf_counter() - started
        return result

    backbone = backbones.get_backbone(backbone_id)
    model, transform = networks.load_feature_extractor(backbone_id, device=dev, fold=fold)
    if batch_size is None:
        settings = choose_run_settings(model, dev, input_size=backbone.input_size, remember_as=backbone.id)
    else:
        settings = RunSettings(batch_size)
    batch_size = settings.batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    workers = default_workers(dev) if num_workers is None else max(0, num_workers)
    prep = backbone.preprocessing
    gpu_decode = 2 * prep.resize_size if dev.type == "cuda" else None  # nvJPEG for large JPEGs
    loader = make_loader(PhotoDataset(todo, transform, load_size=prep.resize_size, raw_jpeg_min_side=gpu_decode),
                         batch_size=loader_batch(batch_size, len(todo), workers), device=dev, workers=workers)
    state = {"batch": batch_size, "channels_last": settings.channels_last}
    buffer = _Buffer(store, key)
    bad: dict[str, str] = {}
    done = total - len(todo)
    batches = iter(loader)
    try:
        with compute_settings(dev, workers=workers):
            for batch in batches:
                if should_cancel is not None and should_cancel():
                    result.cancelled = True
                    break
                for index, reason, permanent in batch["failures"]:
                    result.failed.append((todo[index][0], reason))
                    if permanent:
                        bad[todo[index][0]] = reason
                order, x = _inputs(batch, todo, transform, prep, dev, result)
                if order:
                    buffer.add([todo[i][0] for i in order], infer_with_backoff(model, x, dev, state))
                    result.computed += len(order)
                done += len(batch["index"]) + len(batch["jpeg_index"]) + len(batch["failures"])
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        buffer.flush()
        store.add_failures(key, bad)
        del batches  # stops the worker processes now, also after a cancel
    result.seconds = time.perf_counter() - started
    result.photos_per_s = result.computed / result.seconds if result.seconds > 0 else 0.0
    result.batch_size = state["batch"]
    return result


def loader_batch(batch_size: int, n_photos: int, workers: int) -> int:
    """Photos per decoding batch. Each worker decodes a whole batch, so with workers the batch
    is small enough that every worker gets several (480 photos in batches of 256, as a GPU
    chooses, kept 2 of 8 workers busy: 82 photos/s on an H200 whose network runs 18,800/s);
    the network still runs each batch in one go. Without workers it is the network's batch."""
    if workers <= 0:
        return batch_size
    return max(1, min(batch_size, 64, -(-n_photos // (4 * workers))))


def _inputs(batch: dict, todo: list, transform, prep, dev, result: ExtractionResult):
    """The batch's decoded photos as one tensor, in the order of the returned positions;
    raw JPEGs are decoded on the device, or through PIL where nvJPEG refuses one."""
    import torch

    order = list(batch["index"])
    parts = [batch["x"]] if batch["x"] is not None else []
    if batch["jpegs"]:
        for index, tensor in zip(batch["jpeg_index"], decode_jpegs(batch["jpegs"], dev, prep), strict=True):
            if tensor is None:
                try:
                    tensor = transform(load_for_model(todo[index][1], size=prep.resize_size))
                except Exception as exc:  # noqa: BLE001 - a reason, not a crash
                    result.failed.append((todo[index][0], failure_reason(exc)))
                    continue
            order.append(index)
            parts.append(tensor.unsqueeze(0))
    if not order:
        return [], None
    return order, parts[0] if len(parts) == 1 else torch.cat([p.to(dev) for p in parts])
