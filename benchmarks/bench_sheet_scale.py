"""A label sheet of a million rows: seconds, peak memory, stored problems, Data page render.

Builds (in a temporary folder, nothing in the repository) a project with 60 small photos
and a CSV of ``--rows`` rows naming them and ``rows - 60`` photos that were never uploaded
(the issue's 1,000,000-row sheet), then, in a fresh process per code base so that peak
memory is that process's own, times ``intake.apply_sheet`` (read, match, store problems),
records the peak resident memory, counts the problem rows stored, and times the Data page
(Streamlit's AppTest: the first render, then the median of ``--renders`` more).

Give ``--before`` another checkout (e.g. a worktree of main) to measure both code bases in
one run, alternating (before, after, before, after...) with ``--repeats``:

    .venv/bin/python benchmarks/bench_sheet_scale.py --before /tmp/main-worktree [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import io, json, resource, statistics, sys, time, zipfile
from pathlib import Path
import numpy as np
from PIL import Image
from core import tasks
from core.projects import intake, jobs, workspace

sheet_path, renders, repo = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
project = workspace.create_project("Million rows")
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as zf:
    for i in range(60):
        img = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), i * 4, np.uint8)).save(img, "JPEG")
        zf.writestr(f"photo_{i}.jpg", img.getvalue())
intake.stage_upload(project, filename="photos.zip", data=buf.getvalue())
job = jobs.submit(project, "intake", start=False)
assert jobs.run(project, job.id).status == "done"
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
intake.apply_sheet(project, filename=sheet_path.name, data=sheet_path.read_bytes())
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stored = project.query("SELECT COUNT(*) FROM problems")[0][0]
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(str(repo / "app.py"), default_timeout=600)
at.query_params["project"] = project.slug
at.run()
t = time.perf_counter()
at.switch_page("app_pages/steps/data.py").run()
first = time.perf_counter() - t
again = []
for _ in range(renders):
    t = time.perf_counter()
    at.run()
    again.append(time.perf_counter() - t)
assert not at.exception, at.exception
print(json.dumps({"apply_sheet_s": seconds, "peak_rss_mb": peak / 1024, "rss_before_sheet_mb": base_rss / 1024,
                  "problem_rows_stored": stored, "data_page_first_s": first,
                  "data_page_render_s": statistics.median(again)}))
"""


def _measure(repo: Path, sheet: Path, renders: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-sheet-home-") as home:
        env = {**os.environ, "CATALOG_LENS_HOME": home, "PYTHONPATH": str(repo)}
        out = subprocess.run([sys.executable, "-c", _CHILD, str(sheet), str(renders), str(repo)], cwd=repo, env=env,
                             capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{repo}: the measurement failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--renders", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--before", type=Path, help="another checkout to compare with (e.g. main)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sheet-") as tmp:
        sheet = Path(tmp) / "labels.csv"
        with open(sheet, "w", encoding="utf-8") as out:
            out.write("file,label\n")
            for i in range(args.rows):
                out.write(f"photo_{i}.jpg,{'person' if i % 2 else 'no person'}\n")
        print(f"sheet: {args.rows:,} rows, {sheet.stat().st_size / 2**20:.0f} MB; 60 of its photos uploaded", flush=True)
        variants = ([("before", args.before.resolve())] if args.before else []) + [("after", ROOT)]
        results: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):
            for name, repo in variants:
                results[name].append(_measure(repo, sheet, args.renders))
                print(name, json.dumps(results[name][-1]), flush=True)
    keys = list(next(iter(results.values()))[0])
    print(f"\n{'median of ' + str(args.repeats):<24}" + "".join(f"{name:>14}" for name in results)
          + ("   before/after" if args.before else ""))
    for key in keys:
        values = [statistics.median(r[key] for r in runs) for runs in results.values()]
        ratio = f"{values[0] / values[-1]:>14.1f}x" if args.before and values[-1] else ""
        print(f"{key:<24}" + "".join(f"{v:>14,.1f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
