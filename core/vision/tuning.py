"""How fast a network runs here, and at which batch size: measured, never assumed.

On a CPU, batch size matters the other way round than on a GPU (a large batch falls out
of the caches), and the best one differs from machine to machine, so it is measured per
network, device and torch version and remembered in the app's cache folder. Speeds shown
on the Backbone page are measured the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.base.files import atomic_write_text
from core.vision.backbones import get_backbone
from core.vision.device import (
    autocast,
    compute_settings,
    describe_device,
    empty_cache,
    is_oom,
    pick_device,
    synchronize,
)
from core.vision.fuse import fold_batch_norms
from core.vision.weights import cache_dir

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = ["CPU_CANDIDATES", "CUDA_CANDIDATES", "choose_batch_size", "measure_speed", "remembered_speed"]

CPU_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
CUDA_CANDIDATES = (8, 16, 32, 64, 128, 256)


def _json_memo(name: str) -> tuple[Path, dict]:
    path = cache_dir() / name
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, {}


def _json_remember(name: str, key: str, value) -> None:
    path, memo = _json_memo(name)
    memo[key] = value
    with contextlib.suppress(OSError):  # remembering is an optimisation
        atomic_write_text(path, json.dumps(memo, indent=1, sort_keys=True))


def _machine_key(device: torch.device) -> str:
    import torch

    return f"{describe_device(device)}|torch {torch.__version__}"


def choose_batch_size(
    model: nn.Module,
    device: str | torch.device | None = None,
    *,
    candidates: Sequence[int] | None = None,
    input_size: int = 224,
    repeats: int = 3,
    min_images: int = 16,
    max_seconds: float = 20.0,
    remember_as: str | None = None,
) -> int:
    """The batch size with the fastest time per photo for ``model`` on ``device``.

    First a sweep times each candidate, in increasing order, on ``repeats`` samples of at
    least ``min_images`` photos (one call of a small batch is too short to time); it stops
    once larger batches keep getting slower, when memory runs out, or when the next
    candidate would overrun ``max_seconds``. Then a run-off times the sweep's best and its
    two neighbours in turn, round after round, and keeps the best median: on a shared or
    throttled CPU a burst of load during one candidate's turn otherwise decides the choice
    (measured here: the sweep alone picked 16, 8, 4 and 2 on the same machine, where 4 runs
    1.7x faster than 16). With ``remember_as`` (a backbone id) the choice is saved per
    machine and device, and later calls return it at once.
    """
    import torch

    dev = pick_device(device)
    # Choices remembered by the sweep-only chooser, on networks not yet folded, are measured again once.
    memo_key = f"{remember_as}|{_machine_key(dev)}|folded, run-off" if remember_as else None
    if memo_key:
        _, memo = _json_memo("batch_sizes.json")
        if memo_key in memo:
            return int(memo[memo_key])
    if candidates is None:
        candidates = CUDA_CANDIDATES if dev.type == "cuda" else CPU_CANDIDATES
    candidates = sorted(set(int(c) for c in candidates))
    if not candidates or candidates[0] < 1:
        raise ValueError(f"Batch size candidates must be positive whole numbers: {candidates}.")
    started = time.perf_counter()
    inputs: dict[int, torch.Tensor] = {}

    def per_image(bs: int) -> float:
        """Seconds per photo of one sample of at least ``min_images`` photos."""
        x = inputs[bs]
        calls = max(1, math.ceil(min_images / bs))
        t = time.perf_counter()
        for _ in range(calls):
            model(x)
        synchronize(dev)
        return (time.perf_counter() - t) / (calls * bs)

    tested: list[int] = []
    best, best_time, worse_in_a_row = candidates[0], float("inf"), 0
    with compute_settings(dev), torch.inference_mode(), autocast(dev):
        warm = torch.randn(candidates[0], 3, input_size, input_size, device=dev)
        for _ in range(2):  # first calls pay one-off costs (kernel selection, allocator)
            model(warm.to(memory_format=torch.channels_last))
        for i, bs in enumerate(candidates):
            try:
                inputs[bs] = torch.randn(bs, 3, input_size, input_size, device=dev).to(
                    memory_format=torch.channels_last
                )
                for _ in range(2):  # warm-up for this shape: kernels, allocator, caches
                    model(inputs[bs])
                synchronize(dev)
                sample = min(per_image(bs) for _ in range(repeats))  # load only ever adds time
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_oom(exc):
                    raise
                inputs.pop(bs, None)
                empty_cache(dev)
                break
            tested.append(bs)
            if sample < best_time:
                best, best_time, worse_in_a_row = bs, sample, 0
            elif sample > 1.15 * best_time:
                worse_in_a_row += 1
                if worse_in_a_row >= 2:
                    break
            if i + 1 < len(candidates):
                per_call = sample * candidates[i + 1]
                projected = (repeats * max(1, math.ceil(min_images / candidates[i + 1])) + 2) * per_call
                if time.perf_counter() - started + projected > max_seconds:
                    break
        at = tested.index(best)
        contenders = tested[max(0, at - 1): at + 2]
        if len(contenders) > 1:
            times: dict[int, list[float]] = {bs: [] for bs in contenders}
            for _ in range(max(3, repeats)):
                if time.perf_counter() - started > max_seconds:
                    break
                for bs in contenders:
                    times[bs].append(per_image(bs))
            if all(times.values()):
                best = min(contenders, key=lambda bs: statistics.median(times[bs]))
    if memo_key:
        _json_remember("batch_sizes.json", memo_key, best)
    return best


def measure_speed(
    backbone_id: str, *, device: str | torch.device | None = None, n_images: int = 32
) -> float:
    """Photos per second the backbone's network computes on this machine (forward pass
    only, synthetic input, at its chosen batch size). Measured once per backbone, device
    and torch version, then remembered. Works before the weights are downloaded: speed
    does not depend on the weight values, so a randomly initialised copy is timed."""
    import torch

    backbone = get_backbone(backbone_id)
    dev = pick_device(device)
    known = remembered_speed(backbone.id, dev, n_images=n_images)
    if known is not None:
        return known
    model = backbone.builder().eval().requires_grad_(False)
    size = backbone.input_size
    model, _ = fold_batch_norms(model, torch.randn(2, 3, size, size))  # as load_feature_extractor does
    model = model.to(dev, memory_format=torch.channels_last)
    bs = choose_batch_size(model, dev, input_size=size, remember_as=backbone.id)
    bs = max(1, min(bs, n_images))
    x = torch.randn(bs, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    with compute_settings(dev), torch.inference_mode(), autocast(dev):
        model(x)
        synchronize(dev)
        done, started = 0, time.perf_counter()
        while done < n_images:
            model(x)
            done += bs
        synchronize(dev)
        speed = done / (time.perf_counter() - started)
    _json_remember("speeds.json", _speed_key(backbone.id, dev, n_images), round(speed, 2))
    return speed


def _speed_key(backbone_id: str, device: torch.device, n_images: int) -> str:
    # "folded": speeds remembered before BatchNorm folding (slower) are measured again.
    return f"{backbone_id}|{_machine_key(device)}|n={n_images}|folded"


def remembered_speed(backbone_id: str, device: str | torch.device | None = None, *, n_images: int = 32) -> float | None:
    """The speed :func:`measure_speed` found earlier on this machine (photos/s), or None: never measures."""
    _, memo = _json_memo("speeds.json")
    value = memo.get(_speed_key(backbone_id, pick_device(device), n_images))
    return float(value) if value is not None else None
