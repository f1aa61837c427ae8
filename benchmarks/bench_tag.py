"""Bulk tagging speed and memory on catalogs of NEW photos, against the extraction rate.

    .venv/bin/python benchmarks/bench_tag.py --model MODEL.zip [--photos ../shared/data/product-photos]
        [--rows 6000] [--compare OTHER_CHECKOUT] [--repeats 2] [--project SLUG]

First ``--rows`` new photos are made from the shared ones (each a different crop, mirror
and size, saved as a new JPEG: no feature of them is stored anywhere), and a catalog with one
row per photo. Then, alternating, ``--repeats`` times: the extraction of those photos
(``extract_features``, automatic settings, a new store, timed inside its process) and the
``python -m core tag`` command on the catalog (timed as a whole: start, model, catalog,
photos, output), so the ratio rows/s ÷ extraction photos/s says what tagging adds. With
``--compare`` the same command runs from another checkout too (an earlier commit: ``git
worktree add``). With ``--project`` (this checkout only) it also tags through that project.
Then: peak memory of the command on the 1x catalog and on a 10x catalog (the same photos
ten times over), and a ``kill -9`` midway plus ``--resume`` that must write the same file.
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


def new_photos(source: Path, n: int, folder: Path) -> Path:
    """``n`` photos no store has seen: each a different crop, mirror and size of a shared one."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(source.glob("*.jpg"))
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as img:
            img = img.convert("RGB")
            k = i // len(sources)
            w, h = img.size
            cut = 1 + k % 9
            img = img.crop((cut, cut // 2, w - (k % 5), h - cut))
            img = ImageOps.mirror(img) if k % 2 else img
            img.resize((200 + 4 * (k % 12), 200 + 4 * (k % 12))).save(folder / f"new_{i:05d}.jpg", quality=88 + k % 5)
    return folder


EXTRACT = """
import hashlib, sys, tempfile, time
from pathlib import Path
from core.vision.features import extract_features
from core.vision.store import FeatureStore
paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]
with tempfile.TemporaryDirectory() as tmp:
    started = time.perf_counter()
    result = extract_features(items, backbone_id=sys.argv[2], store=FeatureStore(Path(tmp)))
    print(result.computed / (time.perf_counter() - started))
"""


def extraction_rate(repo: Path, photos: Path, backbone_id: str) -> float:
    """Photos/s of ``extract_features`` (automatic settings, new store) on the photos, timed inside."""
    proc = subprocess.run([sys.executable, "-c", EXTRACT, str(photos), backbone_id], cwd=repo, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{repo}: extraction failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


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
    shared = Path(args.photos)
    if not shared.is_dir():
        sys.exit(f"no photos at {shared}")
    repos = {"this checkout": ROOT} | ({f"compare ({Path(args.compare).name})": Path(args.compare).resolve()}
                                       if args.compare else {})
    sys.path.insert(0, str(ROOT))
    from core.learning.bundles import load_bundle

    backbone_id = load_bundle(args.model)[0].backbone_id
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        photos = new_photos(shared, args.rows, tmp / "photos")
        print(f"{args.rows} new photos made in {time.perf_counter() - started:.0f} s; backbone {backbone_id}")
        cat = tmp / "catalog.csv"
        rows = catalog(photos, args.rows, cat)
        for repo in repos.values():  # settings chosen (once per machine) before anything is timed
            extraction_rate(repo, shared, backbone_id)
        print(f"{'command':<34}{'rows':>7}{'seconds':>9}{'rows/s':>9}{'peak MB':>9}")
        rates: dict[str, list[float]] = {name: [] for name in repos}
        extraction: list[float] = []
        for attempt in range(args.repeats):
            extraction.append(extraction_rate(ROOT, photos, backbone_id))
            print(f"{'extract_features (same photos)':<34}{rows:>7}{rows / extraction[-1]:>9.1f}"
                  f"{extraction[-1]:>9.1f}", flush=True)
            for name, repo in (reversed(repos.items()) if attempt % 2 else repos.items()):
                seconds, peak, _ = run(["tag", "--model", args.model, "--catalog", str(cat), "--images", str(photos),
                                        "--out", str(tmp / f"out-{attempt}-{len(rates[name])}.csv"), "--json"], repo)
                rates[name].append(rows / seconds)
                _row(f"{name} --model", rows, seconds, peak)
        if args.project:
            seconds, peak, _ = run(["tag", "--project", args.project, "--catalog", str(cat), "--images", str(photos),
                                    "--out", str(tmp / "out-project.csv"), "--json"])
            _row("this checkout --project", rows, seconds, peak)
        extract = statistics.median(extraction)
        print(f"median extraction photos/s (same photos): {extract:.1f}")
        for name, values in rates.items():
            print(f"median rows/s, {name}: {statistics.median(values):.1f} "
                  f"({statistics.median(values) / extract:.2f}x the extraction rate)")
        if args.compare:
            this, other = (statistics.median(v) for v in rates.values())
            print(f"ratio this/compare: {this / other:.2f}x")

        peaks = {}
        for copies in (1, 10):
            small = tmp / f"cat{copies}.csv"
            n = catalog(photos, copies * rows, small)
            seconds, peaks[copies], _ = run(["tag", "--model", args.model, "--catalog", str(small), "--images",
                                             str(photos), "--out", str(tmp / f"out{copies}.csv"), "--json"])
            _row(f"{copies}x catalog (memory)", n, seconds, peaks[copies])
        print(f"peak memory 1x catalog: {peaks[1]:.0f} MB, 10x catalog: {peaks[10]:.0f} MB "
              f"({peaks[10] / peaks[1]:.2f}x)")

        # Kill -9 midway, resume, compare with the uninterrupted 1x output.
        small, out = tmp / "cat-kill.csv", tmp / "killed.csv"
        catalog(shared, len(list(shared.glob("*.jpg"))), small)
        base = ["tag", "--model", args.model, "--catalog", str(small), "--images", str(shared), "--out", str(out),
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
        if not db.exists():
            sys.exit(f"the tag command ended before it wrote a row (exit code {proc.returncode})")
        done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
        subprocess.run([sys.executable, "-m", "core", *base, "--resume", "--json"], cwd=ROOT, check=True,
                       capture_output=True)
        run(["tag", "--model", args.model, "--catalog", str(small), "--images", str(shared), "--out",
             str(tmp / "uninterrupted.csv"), "--json"])
        same = out.read_bytes() == (tmp / "uninterrupted.csv").read_bytes()
        print(f"kill -9 after {done} rows, then --resume: output identical to the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
