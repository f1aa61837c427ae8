"""How much faster is the feature-extraction decode path than a plain PIL decode?

Builds a 3000×2000 JPEG with real photo content in a temporary folder (a mosaic of the
shared flat-lay phone photos when ``../shared/data`` is present, otherwise scikit-image's
astronaut upscaled; nothing is written into the repository), then times, in the same
run and interleaved so that machine noise hits both alike:

(a) ``Image.open`` + full decode + resize to 224 px (shorter side), as a notebook does;
(b) ``core.inputs.images.load_for_model(size=224)`` + the same resize.

It prints the median and 90th-percentile milliseconds of each, the ratio (a)/(b) and the
mean absolute pixel difference between the two 224 px results. Run from the project root:

    .venv/bin/python benchmarks/bench_decode.py [--runs 30] [--source mosaic|astronaut]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.inputs import images  # noqa: E402

FLAT_LAY = ROOT.parent / "shared" / "data" / "flat-lay"
WIDTH, HEIGHT = 3000, 2000


def build_photo(source: str) -> tuple[Image.Image, str]:
    """A 3000×2000 RGB image with real photographic content, and a description of it."""
    if source == "mosaic":
        tiles = sorted(FLAT_LAY.glob("*.jpg"))[:18]
        if len(tiles) == 18:
            canvas = Image.new("RGB", (WIDTH, HEIGHT))
            for i, path in enumerate(tiles):  # 6 × 3 tiles of 500 × 667 px
                with Image.open(path) as tile:
                    canvas.paste(
                        tile.convert("RGB").resize((500, 667), Image.Resampling.BICUBIC),
                        ((i % 6) * 500, (i // 6) * 667),
                    )
            return canvas, f"mosaic of 18 flat-lay phone photos ({FLAT_LAY})"
        print(f"note: {FLAT_LAY} not found; using the astronaut instead", file=sys.stderr)
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()).crop((0, 85, 512, 426))  # 3:2
    return astronaut.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), "skimage astronaut, upscaled 5.9×"


def to_model_size(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    return img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)


def pil_full(path: Path, size: int) -> Image.Image:
    with Image.open(path) as img:
        return to_model_size(img.convert("RGB"), size)


def fast_path(path: Path, size: int) -> Image.Image:
    return to_model_size(images.load_for_model(path, size=size), size)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--source", choices=["mosaic", "astronaut"], default="mosaic")
    args = parser.parse_args()

    photo, described = build_photo(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        photo.save(path, quality=90)
        print(f"image: {WIDTH}×{HEIGHT} JPEG q90, {path.stat().st_size / 1e6:.1f} MB — {described}")
        print(f"runs: {args.runs} each, interleaved, after 3 warm-up runs; target {args.size} px\n")

        cases: dict[str, Callable[[], object]] = {
            f"(a) PIL full decode + resize to {args.size}": lambda: pil_full(path, args.size),
            f"(b) load_for_model(size={args.size}) + resize": lambda: fast_path(path, args.size),
            "    inspect_image (intake check)": lambda: images.inspect_image(path),
            "    make_thumbnail(size=256)": lambda: images.make_thumbnail(path, size=256),
        }
        for fn in cases.values():
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():
                times[name].append(timed(fn))

        print(f"{'path':<42} {'median ms':>10} {'p90 ms':>8}")
        for name, values in times.items():
            p90 = float(np.percentile(values, 90))
            print(f"{name:<42} {statistics.median(values):>10.1f} {p90:>8.1f}")
        names = list(times)
        ratio = statistics.median(times[names[0]]) / statistics.median(times[names[1]])
        a = np.asarray(pil_full(path, args.size), dtype=np.float64)
        b = np.asarray(fast_path(path, args.size), dtype=np.float64)
        print(f"\nspeed-up (a)/(b): {ratio:.1f}×")
        print(f"mean |a - b| per pixel and channel: {np.abs(a - b).mean():.2f} / 255 (max {np.abs(a - b).max():.0f})")
        print(f"decoded size on the fast path: {images.load_for_model(path, size=args.size).size}")


if __name__ == "__main__":
    main()
