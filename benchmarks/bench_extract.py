"""How fast does feature extraction run on this machine, compared with the notebook way?

    .venv/bin/python benchmarks/bench_extract.py [--backbone efficientnet_lite0] [--repeats 3]

Data: the 480 real 224 px product photos in ../shared/data/product-photos (skipped with a
message when absent; never copied into the repository) and 64 large JPEGs generated in a
temporary folder (photos upscaled to 2000 px). Configurations, interleaved and repeated so
they share the machine's ups and downs (figures are medians over short samples):

  (a) naive      the notebook loop: PIL open + convert + transform + model, one at a time
  (b) batch 64   extract_features(batch_size=64, num_workers=0)
  (c) chosen     extract_features with the measured batch size and the default workers
  (d) chosen+1w  as (c) with one decoding worker process (to check the default)
  (e) --compare-batch N: as (c) with batch size N (e.g. an earlier choice)
  (f) unfolded   as (c) with the network as published (BatchNorm not folded, "same" padding
                 not static: core/vision/fuse.py)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import core  # noqa: E402,F401  (first: sets OpenMP's wait policy before torch loads)

# isort: split
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from core.vision import backbones as bb  # noqa: E402
from core.vision import features as ft  # noqa: E402
from core.vision import networks as nw  # noqa: E402
from core.vision import tuning  # noqa: E402
from core.vision.device import default_workers, describe_device, pick_device  # noqa: E402
from core.vision.store import FeatureStore  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "product-photos"


def sha_items(paths: list[Path]) -> list[tuple[str, Path]]:
    return [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]


def make_large(folder: Path, n: int = 64, side: int = 2000) -> list[Path]:
    """Large JPEGs from real photos (the shared ones if present, else scikit-image's)."""
    if SHARED.is_dir():
        sources = [Image.open(p).convert("RGB") for p in sorted(SHARED.glob("*.jpg"))[:n]]
    else:
        from skimage import data

        arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        sources = [Image.fromarray(arrays[i % len(arrays)]) for i in range(n)]
    paths = []
    for i, img in enumerate(sources[:n]):
        scale = side / max(img.size)
        big = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        path = folder / f"large_{i:03d}.jpg"
        big.save(path, quality=90)
        paths.append(path)
    return paths


def naive(paths: list[Path], model, transform) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            img = Image.open(path).convert("RGB")
            model(transform(img).unsqueeze(0))
    return len(paths) / (time.perf_counter() - started)


def library(items, backbone_id: str, device, batch_size, num_workers, fold: bool = True) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = ft.extract_features(
            items, backbone_id=backbone_id, store=FeatureStore(Path(tmp)),
            device=device, batch_size=batch_size, num_workers=num_workers, fold=fold,
        )
        seconds = time.perf_counter() - started
    assert result.computed == len({sha for sha, _ in items}) and not result.failed, result
    return len(items) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=bb.DEFAULT_BACKBONE_ID)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="passes over each data set")
    parser.add_argument("--slice", type=int, default=96, help="photos per timed sample")
    parser.add_argument("--compare-batch", type=int, help="also time this batch size (e.g. an earlier choice)")
    args = parser.parse_args()

    device = pick_device(args.device)
    print(f"Device: {describe_device(device)}; torch {torch.__version__}; backbone {args.backbone}")
    backbone = bb.get_backbone(args.backbone)
    model, transform = nw.load_feature_extractor(args.backbone, device=device)
    plain = bb.features_of(backbone, nw.load_pretrained(backbone)).eval().to(device)

    started = time.perf_counter()
    chosen = tuning.choose_batch_size(model, device, input_size=backbone.input_size)
    print(f"Chosen batch size: {chosen} (measured in {time.perf_counter() - started:.1f} s)")
    workers = default_workers(device)

    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        if SHARED.is_dir():
            datasets["480 product photos, 224 px"] = sorted(SHARED.glob("*.jpg"))
        else:
            print(f"Skipping the product photos: {SHARED} not found.")
        datasets["64 large JPEGs, 2000 px"] = make_large(Path(tmp))

        configs = {
            "(a) naive loop, 1 at a time": lambda p, i: naive(p, plain, transform),
            "(b) extract_features, batch 64, 0 workers": lambda p, i: library(i, args.backbone, device, 64, 0),
            f"(c) extract_features, batch {chosen}, {workers} workers (default)":
                lambda p, i: library(i, args.backbone, device, chosen, workers),
            f"(d) extract_features, batch {chosen}, 1 worker":
                lambda p, i: library(i, args.backbone, device, chosen, 1),
        }
        if args.compare_batch:
            configs[f"(e) extract_features, batch {args.compare_batch}, {workers} workers"] = (
                lambda p, i: library(i, args.backbone, device, args.compare_batch, workers))
        configs["(f) as (c), the network as published (not folded, padding not static)"] = (
            lambda p, i: library(i, args.backbone, device, chosen, workers, fold=False))
        for title, paths in datasets.items():
            items = sha_items(paths)
            # Short interleaved samples: every configuration runs on the same slice of
            # photos back to back, so a burst of load from elsewhere hits all of them.
            per_sample = args.slice if len(paths) > 2 * args.slice else max(8, args.slice // 3)
            n_slices = max(1, len(paths) // per_sample)
            runs: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(args.repeats):
                for k in range(n_slices):
                    sl = slice(k * len(paths) // n_slices, (k + 1) * len(paths) // n_slices)
                    for name, run in configs.items():
                        runs[name].append(run(paths[sl], items[sl]))
            print(f"\n{title}: photos/s, median of {len(runs[name])} samples [min-max]")
            base = statistics.median(runs["(a) naive loop, 1 at a time"])
            for name, values in runs.items():
                med = statistics.median(values)
                print(f"  {name:<52} {med:6.1f}  x{med / base:4.2f}  [{min(values):.0f}-{max(values):.0f}]")


if __name__ == "__main__":
    main()
