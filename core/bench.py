"""Speed of feature extraction on this machine, as one JSON object (``python -m core bench extract``).

Four figures for one folder of photos, measured in one run so they share the machine:

- ``forward_img_s``: the limit: the network's forward pass alone, on distinct ready
  tensors already on the device, at the best batch size tried, median of repeats;
- ``pipeline_img_s``: the real path, JPEG files on disk to stored features, cold cache (a new
  store each pass; median of the passes, as for the forward figure). Next to each run of the
  pipeline, forward-only and pipeline passes alternate, and ``pipeline_vs_forward`` is the
  median of each pipeline pass over the forward pass just before it;
- ``naive_img_s``: the notebook way, one photo at a time (open, convert, transform, forward);
- ``cache_hit_s``: seconds for the same extraction again (everything cached).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.inputs.images import load_for_model, looks_like_image_name
from core.vision import backbones, features, networks
from core.vision.device import autocast, compute_settings, default_workers, describe_device, pick_device, synchronize
from core.vision.store import FeatureStore
from core.vision.tuning import CPU_CANDIDATES, CUDA_CANDIDATES, choose_run_settings


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


def _forward_limit(model, images, device, *, repeats: int, candidates=CPU_CANDIDATES,
                   layouts=("channels_last", "contiguous")) -> tuple[float, int, str]:
    """Best photos/s of the forward pass alone over candidate batch sizes and memory layouts.

    ``images`` is a (N, 3, H, W) CPU tensor of distinct photos; each batch is its own
    ready tensor on the device, as the pipeline hands them over.
    """
    import torch

    best = (0.0, 1, "channels_last")
    n = images.shape[0]
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    with compute_settings(device):
        for layout in layouts:
            for bs in candidates:
                if bs > n:
                    break
                batches = [images[i:i + bs].to(device).contiguous(memory_format=formats[layout])
                           for i in range(0, n - bs + 1, bs)]
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


@contextlib.contextmanager
def busy_core(seconds: float = 900.0):
    """Another process spinning on one core (the last this process may use) while the block
    runs; it stops by itself after ``seconds`` in case this process dies first."""
    loop = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", loop])
    with contextlib.suppress(AttributeError, OSError):  # no affinity on macOS / Windows
        os.sched_setaffinity(proc.pid, {max(os.sched_getaffinity(0))})
    try:
        time.sleep(0.3)  # spinning before the timing starts
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _fresh_cache():
    """A new, empty cache folder: nothing measured on this machine is remembered."""
    before = os.environ.get("CATALOG_LENS_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CATALOG_LENS_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("CATALOG_LENS_CACHE_DIR", None)
            else:
                os.environ["CATALOG_LENS_CACHE_DIR"] = before


def _pipeline(items, backbone_id: str, dev, batch_size: int | None = None) -> tuple[float, features.ExtractionResult]:
    """Photos/s of the automatic path into a new store (cold), and its result (``batch_size``:
    the one already chosen, so that only extraction is timed, not the choosing)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = features.extract_features(items, backbone_id=backbone_id, store=FeatureStore(Path(tmp)), device=dev,
                                           batch_size=batch_size)
        return result.computed / (time.perf_counter() - started), result


def bench_extract(
    folder: Path,
    *,
    backbone_id: str | None = None,
    device: str | None = None,
    repeats: int = 3,
    runs: int = 1,
    busy: bool = False,
    naive_limit: int = 96,
    forward_images: int = 128,
) -> dict:
    """Measure extraction speed on a folder of photos; returns the JSON-able figures.

    ``runs`` times the automatic path that many times, each on a fresh cache (so the
    settings are chosen anew each time), each next to its own forward-only and notebook
    figures: ``runs`` lists them. ``busy`` also times the automatic path while another
    process keeps one core busy, interleaved with idle runs (``busy_vs_idle``).
    """
    import torch

    backbone_id = backbone_id or backbones.DEFAULT_BACKBONE_ID
    paths = _image_files(Path(folder))
    if not paths:
        raise ValueError(f"No photos found in {folder}.")
    dev = pick_device(device)
    model, transform = networks.load_feature_extractor(backbone_id, device=dev)
    size = backbones.get_backbone(backbone_id).input_size
    candidates = CUDA_CANDIDATES if dev.type == "cuda" else CPU_CANDIDATES
    if dev.type == "cuda":
        forward_images = max(forward_images, 2 * max(candidates))

    # Distinct ready tensors: the forward pass alone, every batch size and layout once,
    # then again at the best one next to each run of the pipeline.
    sample = paths[: min(forward_images, len(paths))]
    images = torch.stack([transform(load_for_model(p, size=size)) for p in sample])
    forward, forward_bs, layout = _forward_limit(model, images, dev, repeats=repeats, candidates=candidates)
    items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
    records = []
    for _ in range(max(1, runs)):
        with _fresh_cache():
            started = time.perf_counter()
            chosen = choose_run_settings(model, dev, input_size=size, remember_as=backbone_id)
            chooser_s = time.perf_counter() - started
            naive = _naive(model, transform, paths[:naive_limit], dev)
            # ``repeats`` rounds of one forward-only pass then one pipeline pass (each into a new
            # store, the settings chosen once above), and the median of each and of their ratios:
            # one 4-second pass on a shared machine swings by 20 %, and the machine's speed drifts
            # from one minute to the next, so each pipeline pass is compared with its neighbour.
            rounds = []
            for _ in range(max(1, repeats)):
                limit = _forward_limit(model, images, dev, repeats=1, candidates=(forward_bs,), layouts=(layout,))[0]
                rounds.append((limit, *_pipeline(items, backbone_id, dev)))
            run_forward = statistics.median(f for f, _, _ in rounds)
            pipeline, result = statistics.median(p for _, p, _ in rounds), rounds[0][2]
            ratio = statistics.median(p / f for f, p, _ in rounds)
            forward = max(forward, run_forward)
        records.append({
            "batch_size": result.batch_size, "channels_last": chosen.channels_last,
            "workers": default_workers(dev), "threads": torch.get_num_threads(), "chooser_s": round(chooser_s, 1),
            "forward_img_s": round(run_forward, 1), "pipeline_img_s": round(pipeline, 1),
            "forward_passes_img_s": [round(f, 1) for f, _, _ in rounds],
            "pipeline_passes_img_s": [round(p, 1) for _, p, _ in rounds],
            "naive_img_s": round(naive, 1), "pipeline_vs_forward": round(ratio, 2),
            "pipeline_vs_naive": round(pipeline / naive, 2), "failed": len(result.failed),
        })
    first = records[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(Path(tmp))
        features.extract_features(items, backbone_id=backbone_id, store=store, device=dev)
        started = time.perf_counter()
        again = features.extract_features(items, backbone_id=backbone_id, store=store, device=dev)
        cache_hit = time.perf_counter() - started
    out = {
        "device": describe_device(dev),
        "backbone": backbone_id,
        "n_images": len(paths),
        "forward_batch_size": forward_bs,
        "forward_layout": layout,
        **{k: first[k] for k in ("batch_size", "channels_last", "workers", "threads", "forward_img_s",
                                 "pipeline_img_s", "naive_img_s", "pipeline_vs_forward", "pipeline_vs_naive",
                                 "failed")},
        "forward_best_img_s": round(forward, 1),
        "cache_hit_s": round(cache_hit, 3),
        "computed_on_second_run": again.computed,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
    }
    if runs > 1:
        out["runs"] = records
        out["pipeline_vs_forward_each_run"] = [r["pipeline_vs_forward"] for r in records]
        out["pipeline_vs_naive_each_run"] = [r["pipeline_vs_naive"] for r in records]
    if busy:
        idle, loaded = [], []
        for _ in range(max(2, repeats)):  # interleaved: idle, busy, idle, busy...
            # the batch chosen on the idle machine, so both time extraction alone (a choice made
            # while busy ran shorter and made the busy runs look faster than the idle ones)
            idle.append(_pipeline(items, backbone_id, dev, first["batch_size"])[0])
            with busy_core():
                loaded.append(_pipeline(items, backbone_id, dev, first["batch_size"])[0])
        out["idle_img_s"] = round(statistics.median(idle), 1)
        out["busy_one_core_img_s"] = round(statistics.median(loaded), 1)
        out["busy_vs_idle"] = round(statistics.median(loaded) / statistics.median(idle), 2)
    return out
