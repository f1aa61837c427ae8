"""Take the README's screenshots in Chromium from a demo project built on real photos.

    .venv/bin/python -m tests.browser.screenshots [--photos ../shared/data/product-photos] [--n 160]

Builds a throw-away workspace (intake, features, quick model, fine-tuned network, map),
starts the app on it and saves one PNG per page in assets/screenshots/.
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
PAGES = ["home", "data", "backbone", "train", "explore", "tag"]


def build_demo(photos: Path, n: int) -> None:
    from core import extraction, finetune, intake, tagging, training, workspace

    lines = (photos / "labels.csv").read_text().splitlines()
    rows = lines[1:]
    person = [r for r in rows if r.split(",")[1] == "person"][: n // 2]
    other = [r for r in rows if r.split(",")[1] == "no_person"][: n // 2]
    project = workspace.create_project("Person in photo")
    staging = Path(tempfile.mkdtemp())
    for r in person + other:
        shutil.copy(photos / r.split(",")[0], staging)
    intake.stage_folder(project, staging)
    intake.process_staged(project)
    sheet = "\n".join([lines[0], *person, *other]) + "\n"
    intake.apply_sheet(project, filename="labels.csv", data=sheet.encode())
    project.set_class_names({"person": "Person in photo", "no_person": "No person"})
    extraction.extract_project(project, "efficientnet_lite0")
    training.train_frozen(project)
    training.train_finetuned(project, config=finetune.FinetuneConfig(epochs=3))
    training.feature_map(project)
    names = sorted(project.names()["name"])
    catalog = "sku;title;image\n" + "".join(f"S{i};Item {i};{n}\n" for i, n in enumerate(names))
    model = training.tagging_model(project)
    run_id = tagging.start_project_run(
        project, catalog_name="catalog-export.csv", catalog_data=catalog.encode(), bundle_path=Path(model["path"]),
        options=tagging.TagOptions(image_columns=["image"], review_below=0.99))
    tagging.run_tagging(tagging.project_run_folder(project, run_id), project_files=tagging.project_photo_files(project))


def shoot(url: str) -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM_ARGS

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        for name in PAGES:
            page.goto(f"{url}/{'' if name == 'home' else name}?project=person-in-photo")
            page.get_by_text("Computing on").wait_for(timeout=60_000)
            assert page.get_by_text("Page not found").count() == 0, name
            page.wait_for_timeout(6000)  # charts and images settle
            page.screenshot(path=str(OUT / f"{name}.png"))
            print("saved", OUT / f"{name}.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "product-photos"))
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="catalog-lens-shots-"))
    os.environ["CATALOG_LENS_HOME"] = str(home)
    build_demo(Path(args.photos), args.n)
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
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
