"""Turning photos into feature vectors ("CNN codes"), fast and only once.

:func:`extract_features` runs a backbone over a project's photos on the best device,
decoding in worker processes, and stores the result in a :class:`FeatureStore` under a key
made of the backbone, the hash of its weights file and its preprocessing, so a photo is
never computed twice for the same network. Results are written in atomic chunks: a cancel
or a crash keeps every finished chunk, and the next run continues from there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.vision import backbones as _bb
from core.vision.device import cpu_cores, describe_device, pick_device

if TYPE_CHECKING:
    import torch
    from torch import nn

_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK_GLOB = "chunk-*.npz"
_FLUSH_ROWS = 512  # a chunk holds at most this many rows...
_FLUSH_SECONDS = 15.0  # ...or this much work, whichever comes first
CPU_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
CUDA_CANDIDATES = (8, 16, 32, 64, 128, 256)


# --------------------------------------------------------------------------- store


class FeatureStore:
    """Feature vectors of one project, per cache key, as atomic ``.npz`` chunks.

    Each chunk holds ``shas`` (the caller's image ids) and ``features`` (float32 rows); it
    appears on disk complete or not at all (temporary file, fsync, rename). Chunks never
    change once written, so their ids are read once per store object.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._sha_index: dict[Path, list[str]] = {}
        self._lock = threading.Lock()

    def _dir(self, key: str) -> Path:
        if not _KEY_RE.match(key) or key in {".", ".."}:
            raise ValueError(f"Not a feature cache key: {key!r}.")
        return self.root / key

    def _chunks(self, key: str) -> list[Path]:
        folder = self._dir(key)
        return sorted(folder.glob(_CHUNK_GLOB)) if folder.is_dir() else []

    def _chunk_shas(self, chunk: Path) -> list[str]:
        with self._lock:
            if chunk in self._sha_index:
                return self._sha_index[chunk]
        with np.load(chunk, allow_pickle=False) as z:
            shas = [str(s) for s in z["shas"]]
        with self._lock:
            self._sha_index[chunk] = shas
        return shas

    def keys(self) -> list[str]:
        """Cache keys that hold at least one chunk."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _KEY_RE.match(p.name) and any(p.glob(_CHUNK_GLOB))
        )

    def has(self, key: str) -> set[str]:
        """Image ids that have features under ``key``."""
        found: set[str] = set()
        for chunk in self._chunks(key):
            found.update(self._chunk_shas(chunk))
        return found

    def add(self, key: str, shas: Sequence[str], features: np.ndarray) -> Path:
        """Write one chunk atomically and return its path."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(shas):
            raise ValueError(
                f"Expected one feature row per id: {len(shas)} ids, array {features.shape}."
            )
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        return _atomic_npz(folder / name, shas=np.asarray(list(shas), dtype=str), features=features)

    def load(self, key: str, shas: Sequence[str]) -> np.ndarray:
        """Feature rows for ``shas``, in that order (float32, shape (len(shas), dim)).
        ``KeyError`` saying how many are missing when some have no features yet."""
        wanted: dict[str, list[int]] = {}
        for row, sha in enumerate(shas):
            wanted.setdefault(sha, []).append(row)
        out: np.ndarray | None = None
        for chunk in self._chunks(key):
            chunk_shas = self._chunk_shas(chunk)
            take = [(i, s) for i, s in enumerate(chunk_shas) if s in wanted]
            if not take:
                continue
            with np.load(chunk, allow_pickle=False) as z:
                feats = z["features"]
            if out is None:
                out = np.empty((len(shas), feats.shape[1]), dtype=np.float32)
            for i, s in take:
                rows = wanted.pop(s, None)
                if rows is not None:  # first chunk wins if a photo was stored twice
                    out[rows] = feats[i]
            if not wanted:
                break
        if wanted:
            missing = list(wanted)
            raise KeyError(
                f"{len(missing)} of {len(shas)} photos have no features under {key} yet "
                f"(first: {missing[0]}). Run the feature extraction first."
            )
        if out is None:  # nothing asked for
            chunks = self._chunks(key)
            dim = 0
            if chunks:
                with np.load(chunks[0], allow_pickle=False) as z:
                    dim = z["features"].shape[1]
            out = np.empty((0, dim), dtype=np.float32)
        return out

    def failures(self, key: str) -> dict[str, str]:
        """Image ids whose photo could not be decoded under ``key``, with the reason. Ids
        are content hashes, so the same bytes would fail again: they are not retried."""
        folder = self._dir(key)
        found: dict[str, str] = {}
        for path in sorted(folder.glob("failures-*.json")) if folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                found.update(json.loads(path.read_text()))
        return found

    def add_failures(self, key: str, failures: dict[str, str]) -> None:
        """Remember photos that could not be decoded (one atomic file per call)."""
        if not failures:
            return
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"failures-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        tmp = folder / f".tmp-{uuid.uuid4().hex}.json"
        try:
            with open(tmp, "w") as f:
                json.dump(failures, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def compact(self, key: str) -> None:
        """Merge the chunks of ``key`` into one (duplicates dropped). Safe to interrupt:
        the merged chunk is written before the old ones are removed."""
        chunks = self._chunks(key)
        if len(chunks) < 2:
            return
        shas: list[str] = []
        parts: list[np.ndarray] = []
        seen: set[str] = set()
        for chunk in chunks:
            with np.load(chunk, allow_pickle=False) as z:
                chunk_shas, feats = [str(s) for s in z["shas"]], z["features"]
            keep = [i for i, s in enumerate(chunk_shas) if not (s in seen or seen.add(s))]
            shas.extend(chunk_shas[i] for i in keep)
            parts.append(feats[keep])
        self.add(key, shas, np.concatenate(parts))
        for chunk in chunks:
            chunk.unlink(missing_ok=True)
            with self._lock:
                self._sha_index.pop(chunk, None)
        for stale in self._dir(key).glob(".tmp-*"):
            if time.time() - stale.stat().st_mtime > 3600:  # left by a crash long ago
                stale.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        """Remove every feature stored under ``key`` (it vanishes at once, then is freed)."""
        folder = self._dir(key)
        if not folder.exists():
            return
        trash = self.root / f".deleting-{key}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        with self._lock:
            self._sha_index = {p: s for p, s in self._sha_index.items() if p.parent != folder}
        shutil.rmtree(trash, ignore_errors=True)


def _atomic_npz(target: Path, **arrays: np.ndarray) -> Path:
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex}.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError, AttributeError):  # make the rename itself durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def feature_key(backbone_id: str) -> str:
    """The cache key of a backbone's features: id, weights file hash, preprocessing."""
    backbone = _bb.get_backbone(backbone_id)
    return f"{backbone.id}__{_bb.weights_hash(backbone)[:12]}__{_bb.preprocessing_key(backbone)}"


# --------------------------------------------------------------------------- decoding


class _Photos:
    """Map-style dataset for DataLoader workers: (sha, path) → normalised tensor, raw
    JPEG bytes for GPU decoding, or a plain failure reason."""

    def __init__(self, items, transform, load_size: int, raw_jpeg_min_side: int | None):
        self.items = items
        self.transform = transform
        self.load_size = load_size
        self.raw_jpeg_min_side = raw_jpeg_min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        _, path = self.items[index]
        try:
            if self.raw_jpeg_min_side is not None:
                raw = _raw_jpeg(path, self.raw_jpeg_min_side)
                if raw is not None:
                    return index, "jpeg", raw
            return index, "tensor", self.transform(_load(path, self.load_size))
        except Exception as exc:  # one bad photo must never stop the run
            return index, "error", (_reason(exc), _is_content_failure(exc))


def _load(path, size: int):
    from core.inputs.images import load_for_model

    return load_for_model(path, size=size)


def _is_content_failure(exc: Exception) -> bool:
    """True when the bytes themselves are bad (so the same sha would fail again), not when
    the file was missing or locked this time."""
    from core.inputs.images import ImageError

    transient = {"unreadable_file", "image_too_large"}  # the latter depends on a setting
    return isinstance(exc, ImageError) and getattr(exc, "kind", "") not in transient


def _reason(exc: Exception) -> str:
    from core.inputs.images import ImageError

    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "The file could not be found."
    if isinstance(exc, PermissionError):
        return "The file could not be opened (no permission to read it)."
    return f"The photo could not be prepared for the network ({type(exc).__name__}: {exc})."


def _raw_jpeg(path, min_side: int):
    """(bytes as uint8 tensor, EXIF orientation) for a large plain JPEG, else None: those
    are worth decoding on the GPU; everything else takes the safe PIL path."""
    import torch
    from PIL import Image

    from core.inputs.images import MAX_PIXELS

    with Image.open(path) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        width, height = img.size
        if min(width, height) < min_side or width * height > MAX_PIXELS:
            return None
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation


def _collate(samples):
    import torch

    out = {"ok": [], "batch": None, "jpeg": [], "jpegs": [], "errors": []}
    tensors = []
    for index, kind, value in samples:
        if kind == "tensor":
            out["ok"].append(index)
            tensors.append(value)
        elif kind == "jpeg":
            out["jpeg"].append(index)
            out["jpegs"].append(value)
        else:
            out["errors"].append((index, value))
    if tensors:
        out["batch"] = torch.stack(tensors)
    return out


def _worker_init(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


def _orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (as PIL's exif_transpose) to a (C, H, W) tensor."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, k=-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(img, k=1, dims=(-2, -1))
    return img


def _tensor_transform(img: torch.Tensor, prep: _bb.Preprocessing) -> torch.Tensor:
    """The backbone's preprocessing on a decoded uint8 (3, H, W) tensor, on its device."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(prep.interpolation)
    size = [prep.crop_size, prep.crop_size] if prep.crop_mode == "squash" else [prep.resize_size]
    x = F.resize(img.float(), size, interpolation=mode, antialias=True).clamp_(0, 255)
    x = F.center_crop(x, [prep.crop_size, prep.crop_size]) / 255.0
    mean = torch.tensor(prep.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def _decode_jpegs(jpegs, device, prep) -> list:
    """Decode (bytes, orientation) pairs on ``device`` (nvJPEG on CUDA) and preprocess.
    Returns one tensor per photo, or None where that photo needs the PIL path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [data for data, _ in jpegs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io → TorchCodec
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad file fails the whole batch: retry one by one
            images = []
            for data in datas:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    images.append(None)
    return [
        None if img is None else _tensor_transform(_orient(img, orient), prep)
        for img, (_, orient) in zip(images, jpegs, strict=True)
    ]


# --------------------------------------------------------------------------- forward


def autocast(device: torch.device):
    """Half precision on CUDA (bfloat16 where supported), full precision elsewhere."""
    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _empty_cache(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _forward(model: nn.Module, x: torch.Tensor, device: torch.device, state: dict) -> np.ndarray:
    """Features of batch ``x`` in sub-batches of ``state['batch']``; when the device runs
    out of memory the sub-batch is halved and the same rows are tried again."""
    import torch

    outputs, start = [], 0
    while start < len(x):
        step = state["batch"]
        try:
            with torch.inference_mode(), autocast(device):
                part = x[start : start + step].to(
                    device, non_blocking=True, memory_format=torch.channels_last
                )
                out = model(part)
            outputs.append(out.float().cpu().numpy())
            start += step
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_oom(exc) or step == 1:
                raise
            state["batch"] = max(1, step // 2)
            _empty_cache(device)
    return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)


@contextlib.contextmanager
def _cpu_threads(device: torch.device, *, workers: int = 0):
    """On the CPU, the network gets every core the decoding workers leave free."""
    import torch

    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cpu_cores() - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the real time."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --------------------------------------------------------------------------- measurements


def _json_memo(name: str) -> tuple[Path, dict]:
    path = _bb.cache_dir() / name
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError):
        return path, {}


def _json_remember(name: str, key: str, value) -> None:
    path, memo = _json_memo(name)
    memo[key] = value
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(OSError):  # remembering is an optimisation
        tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(tmp, path)


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
    with _cpu_threads(dev), torch.inference_mode(), autocast(dev):
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
                if not _is_oom(exc):
                    raise
                inputs.pop(bs, None)
                _empty_cache(dev)
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

    backbone = _bb.get_backbone(backbone_id)
    dev = pick_device(device)
    known = remembered_speed(backbone.id, dev, n_images=n_images)
    if known is not None:
        return known
    from core.vision.fuse import fold_batch_norms

    model = backbone.builder().eval().requires_grad_(False)
    size = backbone.input_size
    model, _ = fold_batch_norms(model, torch.randn(2, 3, size, size))  # as load_feature_extractor does
    model = model.to(dev, memory_format=torch.channels_last)
    bs = choose_batch_size(model, dev, input_size=size, remember_as=backbone.id)
    bs = max(1, min(bs, n_images))
    x = torch.randn(bs, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    with _cpu_threads(dev), torch.inference_mode(), autocast(dev):
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


# --------------------------------------------------------------------------- extraction


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


def default_num_workers(device: torch.device) -> int:
    """Decoding processes: none on a 2-core CPU (a worker would take a core from the
    network, measured slower), else up to 8, leaving cores for the main process."""
    cores = cpu_cores()
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return max(0, min(8, cores - 1))


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
    :class:`core.vision.backbones.WeightsUnavailable` if the weights cannot be had.
    """
    import torch

    started = time.perf_counter()
    dev = pick_device(device)
    unique: dict[str, Path] = {}
    for sha, path in items:
        unique.setdefault(str(sha), Path(path))
    _bb.ensure_weights(backbone_id)  # downloads on first use; WeightsUnavailable otherwise
    key = feature_key(backbone_id)
    stored = store.has(key)
    known_bad = {sha: why for sha, why in store.failures(key).items() if sha in unique}
    todo = [(sha, p) for sha, p in unique.items() if sha not in stored and sha not in known_bad]
    total = len(unique)
    reused = total - len(todo) - len(known_bad)
    result = ExtractionResult(
        key=key, computed=0, reused=reused, failed=list(known_bad.items()), device=str(dev)
    )
    if on_progress is not None:
        on_progress(total - len(todo), total)
    if not todo or (should_cancel is not None and should_cancel()):
        result.cancelled = bool(todo)
        result.seconds = time.perf_counter() - started
        return result

    backbone = _bb.get_backbone(backbone_id)
    model, transform = _bb.load_feature_extractor(backbone_id, device=dev, fold=fold)
    if batch_size is None:
        batch_size = choose_batch_size(
            model, dev, input_size=backbone.input_size, remember_as=backbone.id
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    workers = default_num_workers(dev) if num_workers is None else max(0, num_workers)
    prep = backbone.preprocessing
    gpu_decode = dev.type == "cuda"
    dataset = _Photos(
        todo, transform, prep.resize_size, 2 * prep.resize_size if gpu_decode else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=dev.type == "cuda",
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    state = {"batch": batch_size}
    buf_shas: list[str] = []
    buf_rows: list[np.ndarray] = []
    bad: dict[str, str] = {}
    last_flush = time.perf_counter()
    done = total - len(todo)

    def flush() -> None:
        nonlocal buf_shas, buf_rows, last_flush
        if buf_shas:
            store.add(key, buf_shas, np.concatenate(buf_rows))
        buf_shas, buf_rows, last_flush = [], [], time.perf_counter()

    batches = iter(loader)
    try:
        with _cpu_threads(dev, workers=workers):
            for batch in batches:
                if should_cancel is not None and should_cancel():
                    result.cancelled = True
                    break
                for index, (reason, permanent) in batch["errors"]:
                    result.failed.append((todo[index][0], reason))
                    if permanent:
                        bad[todo[index][0]] = reason
                order = list(batch["ok"])
                parts = [batch["batch"]] if batch["batch"] is not None else []
                if batch["jpegs"]:
                    decoded = _decode_jpegs(batch["jpegs"], dev, prep)
                    for index, tensor in zip(batch["jpeg"], decoded, strict=True):
                        if tensor is None:  # nvJPEG refused it: take the PIL path here
                            try:
                                tensor = transform(_load(todo[index][1], prep.resize_size))
                            except Exception as exc:
                                result.failed.append((todo[index][0], _reason(exc)))
                                continue
                        order.append(index)
                        parts.append(tensor.unsqueeze(0))
                if order:
                    x = parts[0] if len(parts) == 1 else torch.cat([p.to(dev) for p in parts])
                    feats = _forward(model, x, dev, state)
                    buf_shas.extend(todo[i][0] for i in order)
                    buf_rows.append(feats)
                    result.computed += len(order)
                done += len(batch["ok"]) + len(batch["jpeg"]) + len(batch["errors"])
                if sum(map(len, buf_rows)) >= _FLUSH_ROWS or (
                    time.perf_counter() - last_flush >= _FLUSH_SECONDS
                ):
                    flush()
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        flush()
        store.add_failures(key, bad)
        del batches  # stops the worker processes now, also after a cancel
    result.seconds = time.perf_counter() - started
    result.photos_per_s = result.computed / result.seconds if result.seconds > 0 else 0.0
    result.batch_size = state["batch"]
    return result
