"""Speed of feature extraction on this machine, as one JSON object (``python -m core bench extract``).

Four figures for one folder of photos, measured in one run so they share the machine:

- ``forward_img_s``: the limit: the network's forward pass alone, on distinct ready
  tensors already on the device, at the best batch size tried, median of repeats;
- ``pipeline_img_s``: the real path, JPEG files on disk to stored features, cold cache;
- ``naive_img_s``: the notebook way, one photo at a time (open, convert, transform, forward);
- ``cache_hit_s``: seconds for the same extraction again (everything cached).
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from core.inputs.images import load_for_model, looks_like_image_name
from core.vision import backbones, features, networks
from core.vision.device import autocast, describe_device, pick_device, synchronize
from core.vision.store import FeatureStore
from core.vision.tuning import choose_batch_size

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and looks_like_image_name(p.name)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def upscale_folder(src: Path, dest: Path, *, size: int, limit: int | None = None) -> Path:
    """JPEG copies of a folder's photos with the longer side at ``size`` px (real catalog shots are large)."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    for path in _image_files(src)[:limit]:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / max(img.size)
            img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(
                dest / f"{path.stem}.jpg", quality=90)
    return dest


def _forward_limit(model, images, device, *, repeats: int) -> tuple[float, int, str]:
    """Best photos/s of the forward pass alone over candidate batch sizes and memory layouts.

    ``images`` is a (N, 3, H, W) CPU tensor of distinct photos; each batch is its own
    ready tensor on the device, as the pipeline hands them over.
    """
    import torch

    best = (0.0, 1, "channels_last")
    n = images.shape[0]
    for layout, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        for bs in CANDIDATES:
            if bs > n:
                break
            batches = [images[i:i + bs].to(device).contiguous(memory_format=fmt) for i in range(0, n - bs + 1, bs)]
            rates = []
            with torch.inference_mode(), autocast(device):
                for x in batches[:2]:  # warm-up: kernels chosen for this shape
                    model(x)
                for _ in range(repeats):
                    synchronize(device)
                    started = time.perf_counter()
                    for x in batches:
                        model(x)
                    synchronize(device)
                    rates.append(len(batches) * bs / (time.perf_counter() - started))
            rate = statistics.median(rates)
            if rate > best[0]:
                best = (rate, bs, layout)
    return best


def _naive(model, transform, paths: list[Path], device) -> float:
    """The notebook loop: one photo at a time, full decode, no batching."""
    import torch
    from PIL import Image

    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as img:
                x = transform(img.convert("RGB")).unsqueeze(0).to(device)
            model(x)
        synchronize(device)
    return len(paths) / (time.perf_counter() - started)


def bench_extract(
    folder: Path,
    *,
    backbone_id: str | None = None,
    device: str | None = None,
    repeats: int = 3,
    naive_limit: int = 96,
    forward_images: int = 128,
) -> dict:
    """Measure extraction speed on a folder of photos; returns the JSON-able figures."""
    import torch

    backbone_id = backbone_id or backbones.DEFAULT_BACKBONE_ID
    paths = _image_files(Path(folder))
    if not paths:
        raise ValueError(f"No photos found in {folder}.")
    dev = pick_device(device)
    model, transform = networks.load_feature_extractor(backbone_id, device=dev)
    size = backbones.get_backbone(backbone_id).input_size

    # Distinct ready tensors on the device: the forward pass alone.
    sample = paths[: min(forward_images, len(paths))]
    images = torch.stack([transform(load_for_model(p, size=size)) for p in sample])
    forward, forward_bs, layout = _forward_limit(model, images, dev, repeats=repeats)
    del images

    naive = _naive(model, transform, paths[:naive_limit], dev)
    # The pipeline's batch size is measured once per machine and remembered; do it now so
    # the timing below is the extraction itself.
    choose_batch_size(model, dev, input_size=size, remember_as=backbone_id)

    items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp))
        started = time.perf_counter()
        result = features.extract_features(items, backbone_id=backbone_id, store=store, device=dev)
        pipeline = result.computed / (time.perf_counter() - started)
        started = time.perf_counter()
        again = features.extract_features(items, backbone_id=backbone_id, store=store, device=dev)
        cache_hit = time.perf_counter() - started
    return {
        "device": describe_device(dev),
        "backbone": backbone_id,
        "batch_size": result.batch_size,
        "forward_batch_size": forward_bs,
        "forward_layout": layout,
        "n_images": len(paths),
        "forward_img_s": round(forward, 1),
        "pipeline_img_s": round(pipeline, 1),
        "naive_img_s": round(naive, 1),
        "cache_hit_s": round(cache_hit, 3),
        "computed_on_second_run": again.computed,
        "pipeline_vs_forward": round(pipeline / forward, 2),
        "pipeline_vs_naive": round(pipeline / naive, 2),
        "failed": len(result.failed),
        "torch": torch.__version__,
    }
