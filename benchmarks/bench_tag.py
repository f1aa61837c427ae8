"""Bulk tagging speed and memory on catalogs built from the shared photos.

    .venv/bin/python benchmarks/bench_tag.py --model MODEL.zip [--photos ../shared/data/product-photos]
        [--rows 6000] [--compare OTHER_CHECKOUT] [--repeats 2] [--project SLUG]

Prints, for a catalog of ``--rows`` rows cycling through the photos, the rows/s and the
peak memory of the ``python -m core tag`` process. With ``--compare`` the same command runs
from another checkout of the repository too (an earlier commit: ``git worktree add``),
interleaved with this one, ``--repeats`` times each, so both figures come from one run on
the same machine. With ``--project`` (this checkout only) it also tags through that
project, whose photos already have features. Then: 1× and 10× catalogs for flat memory,
and a ``kill -9`` midway plus ``--resume`` that must write the same file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def catalog(photos: Path, rows: int, out: Path) -> int:
    names = sorted(p.name for p in photos.glob("*.jpg"))
    lines = ["sku;title;image"] + [f"S{i};Item {i};{names[i % len(names)]}" for i in range(rows)]
    out.write_text("\n".join(lines) + "\n")
    return rows


def run(args: list[str], repo: Path = ROOT) -> tuple[float, float, dict]:
    """Seconds, peak RSS (MB) of the child, and its JSON summary."""
    code = ("import resource, sys; import core.cli as c; rc = c.main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{repo}: {' '.join(args[:1])} failed:\n{proc.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK")) / 1024
    return seconds, peak, json.loads(proc.stdout)


def _row(label: str, rows: int, seconds: float, peak: float) -> None:
    print(f"{label:<34}{rows:>7}{seconds:>9.1f}{rows / seconds:>9.1f}{peak:>9.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "product-photos"))
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--compare", help="another checkout of this repository to time the same command from")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--project", help="also tag through this project (its model and features)")
    args = parser.parse_args()
    photos = Path(args.photos)
    if not photos.is_dir():
        sys.exit(f"no photos at {photos}")
    repos = {"this checkout": ROOT} | ({f"compare ({Path(args.compare).name})": Path(args.compare).resolve()}
                                       if args.compare else {})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cat = tmp / "catalog.csv"
        rows = catalog(photos, args.rows, cat)
        print(f"{'command':<34}{'rows':>7}{'seconds':>9}{'rows/s':>9}{'peak MB':>9}")
        rates: dict[str, list[float]] = {name: [] for name in repos}
        for attempt in range(args.repeats):
            for name, repo in (reversed(repos.items()) if attempt % 2 else repos.items()):
                seconds, peak, _ = run(["tag", "--model", args.model, "--catalog", str(cat), "--images", str(photos),
                                        "--out", str(tmp / f"out-{attempt}-{len(rates[name])}.csv"), "--json"], repo)
                rates[name].append(rows / seconds)
                _row(f"{name} --model", rows, seconds, peak)
        if args.project:
            seconds, peak, _ = run(["tag", "--project", args.project, "--catalog", str(cat), "--images", str(photos),
                                    "--out", str(tmp / "out-project.csv"), "--json"])
            _row("this checkout --project", rows, seconds, peak)
        for name, values in rates.items():
            print(f"median rows/s, {name}: {statistics.median(values):.1f}")
        if args.compare:
            this, other = (statistics.median(v) for v in rates.values())
            print(f"ratio this/compare: {this / other:.2f}x")

        for copies in (1, 10):
            small = tmp / f"cat{copies}.csv"
            n = catalog(photos, copies * len(list(photos.glob('*.jpg'))), small)
            seconds, peak, _ = run(["tag", "--model", args.model, "--catalog", str(small), "--images", str(photos),
                                    "--out", str(tmp / f"out{copies}.csv"), "--json"])
            _row(f"{copies}x photos (memory)", n, seconds, peak)

        # Kill -9 midway, resume, compare with the uninterrupted 1x output.
        small, out = tmp / "cat1.csv", tmp / "killed.csv"
        base = ["tag", "--model", args.model, "--catalog", str(small), "--images", str(photos), "--out", str(out),
                "--chunk-rows", "32"]
        proc = subprocess.Popen([sys.executable, "-m", "core", *base], cwd=ROOT,
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
        subprocess.run([sys.executable, "-m", "core", *base, "--resume", "--json"], cwd=ROOT, check=True,
                       capture_output=True)
        same = out.read_bytes() == (tmp / "out1.csv").read_bytes()
        print(f"kill -9 after {done} rows, then --resume: output identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
