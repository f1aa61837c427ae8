"""Bulk tagging: every row kept in order, original cells untouched, kill -9 and resume."""

from __future__ import annotations

import csv
import io
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageOps

from core import cli
from core.tagging import run as tagging
from tests.conftest import REPO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A frozen model trained on scikit-image photos, and a cp1252 semicolon catalog naming them."""
    from skimage import data

    root = tmp_path_factory.mktemp("tagging")
    photos = root / "photos"
    photos.mkdir()
    rows = ["file,label"]
    for label, arrays in {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea()]}.items():
        for i in range(10):
            img = Image.fromarray(arrays[i % len(arrays)]).convert("RGB").rotate(i - 5)
            img = ImageOps.mirror(img) if i % 2 else img
            img.save(photos / f"{label}_{i}.jpg", quality=88)
            rows.append(f"{label}_{i}.jpg,{label}")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    sheet = root / "labels.csv"
    sheet.write_text("\n".join(rows) + "\n")
    bundle = root / "model.zip"
    env_home = root / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("CATALOG_LENS_HOME", str(env_home))
    assert cli.main(["train", "--images", str(photos), "--labels", str(sheet), "--method", "frozen",
                     "--out", str(bundle), "--json"]) == 0
    names = sorted(p.name for p in photos.glob("*_*.jpg"))
    lines = ["Référence;Désignation;Photo;Remarque"]
    for i in range(60):
        lines.append(f"R{i:03d};Article n° {i};{names[i % len(names)].upper()};  gardé tel quel  ")
    lines += ["R900;Sans photo;;", "R901;Photo absente;absente.jpg;", "R902;Photo cassée;broken.jpg;x"]
    catalog = root / "catalogue.csv"
    catalog.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    yield {"root": root, "photos": photos, "bundle": bundle, "catalog": catalog, "rows": len(lines) - 1}
    mp.undo()


def _read(path, encoding="cp1252"):
    return list(csv.reader(io.StringIO(path.read_bytes().decode(encoding)), delimiter=";"))


def test_output_keeps_every_row_and_cell_and_adds_the_tags(setup, capsys):
    out = setup["root"] / "tagged.csv"
    assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(setup["catalog"]),
                     "--images", str(setup["photos"]), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == summary["done"] == setup["rows"]
    original, tagged = _read(setup["catalog"]), _read(out)
    assert len(tagged) == len(original)
    assert tagged[0] == original[0] + ["predicted_label", "confidence", "needs_review", "tag_error", "model_id"]
    for before, after in zip(original[1:], tagged[1:]):
        assert after[:4] == before  # untouched, spaces and accents included, in order
    by_ref = {row[0]: row for row in tagged[1:]}
    assert by_ref["R000"][4] in {"person", "no_person"} and by_ref["R000"][7] == ""
    person_rows = [r for r in tagged[1:61] if r[2].startswith("PERSON")]
    assert sum(r[4] == "person" for r in person_rows) >= 0.8 * len(person_rows)
    assert by_ref["R900"][4] == "" and "no photo" in by_ref["R900"][7]
    assert "absente.jpg" in by_ref["R901"][7]
    assert by_ref["R902"][4] == "" and by_ref["R902"][7] and by_ref["R902"][6] == "yes"


def test_xlsx_output(setup):
    import openpyxl

    out = setup["root"] / "tagged.xlsx"
    assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(setup["catalog"]),
                     "--images", str(setup["photos"]), "--out", str(out)]) == 0
    sheet = openpyxl.load_workbook(out).active
    assert sheet.max_row == setup["rows"] + 1
    assert [c.value for c in sheet[1]][-5:] == ["predicted_label", "confidence", "needs_review", "tag_error",
                                                "model_id"]


def test_kill_9_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    args = ["--model", str(setup["bundle"]), "--catalog", str(setup["catalog"]), "--images", str(setup["photos"]),
            "--chunk-rows", "4"]
    whole = tmp_path / "whole.csv"
    assert cli.main(["tag", *args, "--out", str(whole)]) == 0
    broken = tmp_path / "broken.csv"
    proc = subprocess.Popen([sys.executable, "-m", "core", "tag", *args, "--out", str(broken), "--json"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = broken.with_name(broken.name + ".run") / "results.db"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                done = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.Error:
                done = 0
            if done >= 8:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < done < setup["rows"], "the run must be killed midway"
    assert cli.main(["tag", *args, "--out", str(broken), "--resume"]) == 0
    rows = sqlite3.connect(db).execute("SELECT COUNT(*), COUNT(DISTINCT row) FROM results").fetchone()
    assert rows == (setup["rows"], setup["rows"])  # nothing lost, nothing twice
    assert broken.read_bytes() == whole.read_bytes()


def test_share_by_a_category_column():
    import pandas as pd

    from core.tagging.run import share_by

    table = share_by(pd.Series(["shoes", "shoes", "tops", "tops", "tops"]),
                     pd.Series({0: "1", 1: "0", 2: "1", 3: "1"}), names={"1": "Person"})
    assert list(table.index) == ["tops", "shoes"]  # largest group first
    assert table.loc["tops"].to_dict() == {"0": 0, "Person": 2, "could not be tagged": 1}


def test_photos_given_as_links_are_downloaded_and_failed_links_are_row_errors(setup, tmp_path, monkeypatch):
    """Links are fetched (a test server on 127.0.0.1, allowed by configuration only here)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(setup["photos"]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        catalog = tmp_path / "links.csv"
        catalog.write_text(f"id,image_link\nA,{base}/person_0.jpg\nB,{base}/no_person_1.jpg\nC,{base}/missing.jpg\n"
                           "D,http://169.254.169.254/latest/meta-data\n")
        monkeypatch.setenv("CATALOG_LENS_ALLOW_PRIVATE_URLS", "1")
        out = tmp_path / "links-tagged.csv"
        assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--out", str(out)]) == 0
    finally:
        server.shutdown()
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8-sig"))))
    by_id = {r[0]: r for r in rows[1:]}
    assert by_id["A"][2] == "person" and by_id["B"][2] == "no_person"
    assert "404" in by_id["C"][5]
    assert by_id["D"][2] == "" and "download failed" in by_id["D"][5]
    # Thumbnails (review queue, report) come from the run's own downloads, without the server.
    folder = out.with_name(out.name + ".run")
    items = [{"row": i, "photos": [row[1]]} for i, row in enumerate(rows[1:])]
    found = tagging.review_photos(folder, items)
    assert found[0] is not None and found[0].read_bytes() == (setup["photos"] / "person_0.jpg").read_bytes()
    assert found[2] is None and found[3] is None  # a 404 and a refused address left nothing


def test_one_photo_per_row_exports_get_one_tag_per_product(setup, tmp_path):
    """Shopify-style: several rows per product; 'any photo shows a person' tags the whole product."""
    catalog = tmp_path / "shopify.csv"
    catalog.write_text("Handle,Title,Image Src,Image Position\n"
                       "shirt,Shirt,person_0.jpg,1\nshirt,,no_person_1.jpg,2\n"
                       "mug,Mug,no_person_2.jpg,1\nmug,,no_person_3.jpg,2\n")
    out = tmp_path / "shopify-tagged.csv"
    assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--images",
                     str(setup["photos"]), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8-sig"))))
    assert [r["Handle"] for r in rows] == ["shirt", "shirt", "mug", "mug"]
    assert {r["product_tag"] for r in rows if r["Handle"] == "shirt"} == {"person"}
    assert {r["product_tag"] for r in rows if r["Handle"] == "mug"} == {"no_person"}
