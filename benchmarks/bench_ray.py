"""Tagging speed, single machine vs Ray Data, on the same catalog in one run.

    .venv/bin/python benchmarks/bench_ray.py --model MODEL.zip [--photos ../shared/data/product-photos]
        [--rows 6000] [--repeats 1] [--cpus N] [--workers N]

Builds the catalog of ``bench_tag.py`` (``--rows`` rows cycling through the photos), then
runs ``python -m core tag`` on it with the default engine and with ``--engine ray`` (a
local Ray instance with ``--cpus`` CPUs, all by default), interleaved ``--repeats`` times,
and prints rows/s and peak memory of the command for each, their ratio, and whether both
engines wrote the same file. Ray's figures include starting Ray and loading one model per
worker: what a user waits for. Peak memory is the command's own process (Ray's workers are
other processes). Needs requirements-ray.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench_tag import ROOT, _row, catalog, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "product-photos"))
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--workers", type=int, help="Ray workers (default: one per CPU)")
    args = parser.parse_args()
    photos = Path(args.photos)
    if not photos.is_dir():
        sys.exit(f"no photos at {photos}")
    ray_flags = (
        ["--engine", "ray"]
        + (["--cpus", str(args.cpus)] if args.cpus else [])
        + (["--workers", str(args.workers)] if args.workers else [])
    )
    engines = {"single machine": [], f"ray ({' '.join(ray_flags[2:]) or 'all CPUs'})": ray_flags}
    print(f"{os.cpu_count()} CPUs here; catalog of {args.rows} rows over {len(list(photos.glob('*.jpg')))} photos")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cat = tmp / "catalog.csv"
        rows = catalog(photos, args.rows, cat)
        print(f"{'engine':<34}{'rows':>7}{'seconds':>9}{'rows/s':>9}{'peak MB':>9}")
        rates: dict[str, list[float]] = {name: [] for name in engines}
        outputs: dict[str, Path] = {}
        for attempt in range(args.repeats):
            for name, flags in reversed(engines.items()) if attempt % 2 else engines.items():
                out = tmp / f"out-{len(outputs)}-{attempt}.csv"
                seconds, peak, _ = run(
                    [
                        "tag",
                        "--model",
                        args.model,
                        "--catalog",
                        str(cat),
                        "--images",
                        str(photos),
                        "--out",
                        str(out),
                        "--json",
                        *flags,
                    ]
                )
                rates[name].append(rows / seconds)
                outputs[name] = out
                _row(name, rows, seconds, peak)
        for name, values in rates.items():
            print(f"median rows/s, {name}: {statistics.median(values):.1f}")
        local, ray = (statistics.median(v) for v in rates.values())
        print(f"ratio ray/single machine: {ray / local:.2f}x")
        print(f"both engines wrote the same file, byte for byte: {_compare(*outputs.values())}")


def _compare(a: Path, b: Path) -> str:
    """ "yes", or which cells differ and by how much (the confidence can differ in its last
    digit: a photo's features computed in another batch round differently)."""
    if a.read_bytes() == b.read_bytes():
        return "yes"
    import pandas as pd

    x, y = (pd.read_csv(p, sep=";", dtype=str, keep_default_na=False) for p in (a, b))
    if x.shape != y.shape or list(x.columns) != list(y.columns):
        return f"no: shapes {x.shape} and {y.shape}"
    differ = {c: int((x[c] != y[c]).sum()) for c in x.columns if (x[c] != y[c]).any()}
    conf = (pd.to_numeric(x["confidence"]) - pd.to_numeric(y["confidence"])).abs().max()
    return f"no: cells differing by column {differ}; largest confidence difference {conf:.4f}"


if __name__ == "__main__":
    main()
