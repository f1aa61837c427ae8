"""Take the README's screenshots in Chromium, from a demo project built on the shared real photos.

    .venv/bin/python -m tests.browser.screenshots [--data ../shared/data] [--epochs 8]

Builds a throw-away workspace with ``core.demo`` (every step done; the catalog is the
studio photos plus phone photos of garments laid flat, with a ``source`` column), starts
the app on it and saves one PNG per page in ``assets/screenshots/``, plus the first page
of the exported report as ``report-file.png``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "assets" / "screenshots"
PAGES = {  # page: what must be on screen before the shot
    "home": "Project: Person in photo",
    "data": "Labelled",
    "backbone": "Features are ready",
    "train": "Verdict",
    "explore": "Likely label mistakes",
    "tag": "rows done",
    "report": "What was not checked",
}
PROJECT = "person-in-photo"


def build(data: Path, work: Path, epochs: int | None) -> None:
    from core import demo

    photos, flat = data / "product-photos", data / "flat-lay"
    extra = work / "catalog-photos"
    extra.mkdir()
    flat_rows = (flat / "labels.csv").read_text().splitlines()[1:61]
    for row in flat_rows:
        shutil.copy(flat / row.split(",")[0], extra)
    studio = sorted(p.name for p in photos.glob("*.jpg"))
    catalog = work / "catalog-export.csv"
    catalog.write_text("sku,title,source,image\n" + "".join(
        f"ST-{i:04d},Studio item {i},Studio catalog,{n}\n" for i, n in enumerate(studio)) + "".join(
        f"FL-{i:04d},{r.split(',')[2]},Phone photo (flat lay),{r.split(',')[0]}\n" for i, r in enumerate(flat_rows)))
    demo.build_demo(photos, photos / "labels.csv", name="Person in photo",
                    class_names={"person": "Person in photo", "no_person": "No person"},
                    catalog=catalog, catalog_images=extra, epochs=epochs, say=print)


def shoot(url: str) -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM_ARGS

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        for name, ready in PAGES.items():
            page.goto(f"{url}/{'' if name == 'home' else name}?project={PROJECT}")
            page.get_by_text("Computing on").wait_for(timeout=60_000)
            page.get_by_text(ready).first.wait_for(timeout=120_000)
            assert page.get_by_text("Page not found").count() == 0, name
            page.wait_for_timeout(4000)  # charts and images settle
            page.screenshot(path=str(OUT / f"{name}.png"))
            print("saved", OUT / f"{name}.png")
        with page.expect_download() as download:
            page.get_by_role("button", name="Download the report (HTML)").click()
        report = Path(tempfile.mkdtemp()) / "report.html"
        download.value.save_as(report)
        page.set_viewport_size({"width": 1100, "height": 1400})
        page.goto(report.as_uri())
        page.screenshot(path=str(OUT / "report-file.png"))
        print("saved", OUT / "report-file.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the app's)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="catalog-lens-shots-"))
    os.environ["CATALOG_LENS_HOME"] = str(work / "home")
    build(Path(args.data), work, args.epochs)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(args.port)],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{args.port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        shoot(url)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
