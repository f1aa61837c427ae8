"""Bulk tagging speed and memory on catalogs built from the shared photos (1× and 10×).

    .venv/bin/python benchmarks/bench_tag.py --model MODEL.zip [--photos ../shared/data/product-photos]

Prints rows/s and the peak memory of the `python -m core tag` process for a catalog of
every photo once and of every photo ten times, and checks that a killed-and-resumed
run writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def catalog(photos: Path, copies: int, out: Path) -> int:
    names = sorted(p.name for p in photos.glob("*.jpg"))
    lines = ["sku;title;image"] + [f"S{c}-{i};Item {i};{n}" for c in range(copies) for i, n in enumerate(names)]
    out.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


def run(args: list[str]) -> tuple[float, float, dict]:
    """Seconds, peak RSS (MB) of the child, and its JSON summary."""
    code = ("import resource, runpy, sys; sys.argv = ['core'] + sys.argv[1:]; "
            "import core.cli as c; rc = c.main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK")) / 1024
    return seconds, peak, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "product-photos"))
    args = parser.parse_args()
    photos = Path(args.photos)
    if not photos.is_dir():
        sys.exit(f"no photos at {photos}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'catalog':<10}{'rows':>8}{'seconds':>10}{'rows/s':>9}{'photos/s':>10}{'peak MB':>9}")
        for copies in (1, 10):
            cat = tmp / f"cat{copies}.csv"
            rows = catalog(photos, copies, cat)
            seconds, peak, summary = run(["tag", "--model", args.model, "--catalog", str(cat), "--images",
                                          str(photos), "--out", str(tmp / f"out{copies}.csv"), "--json"])
            print(f"{copies}x{'':<8}{rows:>8}{seconds:>10.1f}{rows / seconds:>9.1f}"
                  f"{summary['photos_per_s']:>10.1f}{peak:>9.0f}")
        # Kill -9 midway, resume, compare with the uninterrupted 1x output.
        cat = tmp / "cat1.csv"
        out = tmp / "killed.csv"
        proc = subprocess.Popen([sys.executable, "-m", "core", "tag", "--model", args.model, "--catalog", str(cat),
                                 "--images", str(photos), "--out", str(out), "--chunk-rows", "32"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db = out.with_name(out.name + ".run") / "results.db"
        while proc.poll() is None:
            try:
                if db.exists() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0] >= 96:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
        subprocess.run([sys.executable, "-m", "core", "tag", "--model", args.model, "--catalog", str(cat), "--images",
                        str(photos), "--out", str(out), "--chunk-rows", "32", "--resume", "--json"], cwd=ROOT,
                       check=True, capture_output=True)
        same = out.read_bytes() == (tmp / "out1.csv").read_bytes()
        print(f"kill -9 after {done} rows, then --resume: output identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
