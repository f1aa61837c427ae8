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
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from core.vision.fuse import for_inference
from core.vision.weights import cache_dir

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = [
    "CPU_CANDIDATES", "CUDA_CANDIDATES", "RunSettings", "choose_batch_size", "choose_run_settings", "measure_speed",
    "pick_batch", "remembered_speed",
]

CPU_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
CUDA_CANDIDATES = (8, 16, 32, 64, 128, 256)
# When a loaded machine leaves no time for a verdict: the batch measured best on 2-core CPUs
# (issue 12 and the extraction benchmark's forward-only limit: 4) and on GPUs.
FALLBACK_BATCH = {"cpu": 4, "cuda": 64, "mps": 32}

# Choices not measured robustly enough to be saved are kept for this process's lifetime
# (per cache folder), so that one run of many extractions measures once.
_THIS_PROCESS: dict[tuple[str, str], RunSettings] = {}


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


@dataclass(frozen=True)
class RunSettings:
    """How the network runs best here: photos per call and the input's memory layout."""

    batch_size: int
    channels_last: bool = True


def choose_batch_size(model: nn.Module, device: str | torch.device | None = None, **kwargs) -> int:
    """The batch size of :func:`choose_run_settings` (same arguments)."""
    return choose_run_settings(model, device, **kwargs).batch_size


def choose_run_settings(
    model: nn.Module,
    device: str | torch.device | None = None,
    *,
    candidates: Sequence[int] | None = None,
    input_size: int = 224,
    rounds: int = 5,
    min_images: int = 32,
    tolerance: float = 0.03,
    max_seconds: float = 40.0,
    remember_as: str | None = None,
) -> RunSettings:
    """The batch size and input layout with the fastest time per photo for ``model`` on ``device``.

    A short sweep in increasing order finds where larger batches stop paying (it stops
    after two candidates more than 15 % slower than the best, or when memory runs out).
    Then every candidate within 1.5x of the best is timed in ``rounds`` interleaved rounds,
    in a new order each round, on at least ``min_images`` photos a sample, and each keeps
    its fastest sample: load from elsewhere only ever adds time, and interleaving spreads
    it over all candidates. The choice is the SMALLEST batch within ``tolerance`` of the
    fastest: batches that close in speed are a tie that noise would decide, and the smaller
    one costs less memory (measured, issue 12: a sweep of single samples picked 1 where 4
    ran 2.3x faster, and 16, 8, 4 or 2 on one machine). Channels-last input is kept unless
    the plain layout beats it by more than ``tolerance`` in interleaved rounds of its own.

    With ``remember_as`` (a backbone id) the choice is saved per machine and device, and
    later calls return it at once, but only when it was measured robustly: the median
    samples must point to the same choice as the fastest ones. A choice that noise could
    have made is used for this run only and measured again next time.
    """
    import torch

    dev = pick_device(device)
    memo_key = f"{remember_as}|{_machine_key(dev)}|interleaved rounds v3" if remember_as else None
    if memo_key:
        path, memo = _json_memo("batch_sizes.json")
        if (str(path), memo_key) in _THIS_PROCESS:
            return _THIS_PROCESS[str(path), memo_key]
        if isinstance(memo.get(memo_key), dict):
            known = memo[memo_key]
            return RunSettings(int(known["batch_size"]), bool(known.get("channels_last", True)))
    if candidates is None:
        candidates = CUDA_CANDIDATES if dev.type == "cuda" else CPU_CANDIDATES
    candidates = sorted(set(int(c) for c in candidates))
    if not candidates or candidates[0] < 1:
        raise ValueError(f"Batch size candidates must be positive whole numbers: {candidates}.")
    started = time.perf_counter()
    inputs: dict[tuple[int, bool], torch.Tensor] = {}

    def per_image(key: tuple[int, bool]) -> float:
        """Seconds per photo of one sample of at least ``min_images`` photos."""
        x, bs = inputs[key], key[0]
        calls = max(1, math.ceil(min_images / bs))
        synchronize(dev)
        t = time.perf_counter()
        for _ in range(calls):
            model(x)
        synchronize(dev)
        return (time.perf_counter() - t) / (calls * bs)

    def prepare(bs: int, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        inputs[bs, channels_last] = torch.randn(bs, 3, input_size, input_size, device=dev).contiguous(
            memory_format=fmt)
        for _ in range(2):  # warm-up for this shape: kernels, allocator, caches
            model(inputs[bs, channels_last])

    samples: dict[tuple[int, bool], list[float]] = {}
    with compute_settings(dev), torch.inference_mode(), autocast(dev):
        best_time, worse_in_a_row = float("inf"), 0
        for bs in candidates:  # the sweep: where do larger batches stop paying?
            try:
                prepare(bs, True)
                sample = per_image((bs, True))
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_oom(exc):
                    raise
                inputs.pop((bs, True), None)
                empty_cache(dev)
                break
            samples[bs, True] = [sample]
            if sample < best_time:
                best_time, worse_in_a_row = sample, 0
            elif sample > 1.15 * best_time:
                worse_in_a_row += 1
                if worse_in_a_row >= 2:
                    break
            if time.perf_counter() - started > max_seconds / 3:
                break
        if not samples:  # not even the smallest batch fits: it is the one to try, halved on the way
            return RunSettings(candidates[0])
        contenders = [k for k, v in samples.items() if v[0] <= 1.5 * best_time]
        _rounds(contenders, samples, per_image, rounds, started, max_seconds)
        chosen, robust = pick_batch({k: samples[k] for k in contenders}, tolerance=tolerance)
        if not all(len(samples[k]) >= 3 for k in contenders):  # out of time (a loaded machine): no verdict
            robust = False
            fallback = (FALLBACK_BATCH.get(dev.type, FALLBACK_BATCH["cpu"]), True)
            if fallback in contenders:  # the batch measured best on such machines, if it is a close one here
                chosen = fallback
        plain = (chosen[0], False)
        prepare(*plain)
        samples[plain] = []
        _rounds([chosen, plain], samples, per_image, max(3, rounds // 2), started, 1.25 * max_seconds)
        if samples[plain] and min(samples[plain]) < (1 - tolerance) * min(samples[chosen]):
            chosen = plain
    settings = RunSettings(chosen[0], chosen[1])
    if memo_key:
        _THIS_PROCESS[str(_json_memo("batch_sizes.json")[0]), memo_key] = settings
    if memo_key and robust:
        _json_remember("batch_sizes.json", memo_key, {"batch_size": settings.batch_size,
                                                      "channels_last": settings.channels_last})
    return settings


def _rounds(keys: list, samples: dict, per_image: Callable, rounds: int, started: float, max_seconds: float) -> None:
    """Time every key once per round, in a new order each round (seeded: reproducible)."""
    order = random.Random(len(keys))
    for _ in range(rounds):
        if time.perf_counter() - started > max_seconds:
            break
        for key in order.sample(keys, len(keys)):
            samples[key].append(per_image(key))


def pick_batch(samples: Mapping, *, tolerance: float = 0.03) -> tuple:
    """The choice among timed candidates and whether it is robust: ``samples`` maps a key
    whose first item is the batch size to its seconds per photo, one per round.

    The choice is the smallest batch whose fastest sample is within ``tolerance`` of the
    fastest of all (load only adds time, so the fastest sample is the truest). It is robust
    when its median sample is also within twice ``tolerance`` of the best median: good by
    both measures, even where the medians would prefer a neighbour as good (batch 8 and 16
    trade places run after run here, and a choice never saved cost every job ~20 s of choosing).
    """
    timed = {k: v for k, v in samples.items() if v}
    fastest = {k: min(v) for k, v in timed.items()}
    chosen = min((k for k in timed if fastest[k] <= (1 + tolerance) * min(fastest.values())), key=lambda k: k[0])
    medians = {k: statistics.median(v) for k, v in timed.items()}
    return chosen, medians[chosen] <= (1 + 2 * tolerance) * min(medians.values())


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
    # as load_feature_extractor does
    model = for_inference(model, torch.randn(2, 3, size, size), static_padding=dev.type == "cpu")
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
    # Speeds remembered before BatchNorm folding and static padding (slower) are measured again.
    return f"{backbone_id}|{_machine_key(device)}|n={n_images}|folded, static padding"


def remembered_speed(backbone_id: str, device: str | torch.device | None = None, *, n_images: int = 32) -> float | None:
    """The speed :func:`measure_speed` found earlier on this machine (photos/s), or None: never measures."""
    _, memo = _json_memo("speeds.json")
    value = memo.get(_speed_key(backbone_id, pick_device(device), n_images))
    return float(value) if value is not None else None
