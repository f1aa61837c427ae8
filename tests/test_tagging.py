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
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from core import cli, tagging
from core.inputs import images
from core.projects.state import ProjectState
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

    table = tagging.share_by(pd.Series(["shoes", "shoes", "tops", "tops", "tops"]),
                             pd.Series({0: "1", 1: "0", 2: "1", 3: "1"}), names={"1": "Person"})
    assert list(table.index) == ["tops", "shoes"]  # largest group first
    assert table.loc["tops"].to_dict() == {"0": 0, "Person": 2, "could not be tagged": 1}


@pytest.mark.parametrize(
    ("tags", "rule", "expected"),
    [
        (["no", "person", "no"], "any", "person"),
        (["no", "person", "no"], "all", "no"),
        (["person", None, "person"], "all", "person"),
        (["no", "person"], "first", "no"),
        ([None, "person", "no"], "first", "person"),
        (["person", "no", "person"], "majority", "person"),
        (["person", "no"], "majority", "no"),
        ([None, None], "any", None),
        ([], "majority", None),
    ],
)
def test_combine(tags, rule, expected):
    assert tagging.combine(tags, rule=rule, positive="person") == expected


def test_combine_unknown_rule():
    with pytest.raises(ValueError, match="expected one of"):
        tagging.combine(["a"], rule="most", positive="a")


def test_split_columns_offer_category_like_columns_first_and_keep_the_analysts_choice():
    import pandas as pd

    frame = pd.DataFrame({
        "sku": [f"S{i}" for i in range(12)],
        "image": [f"p{i}.jpg" for i in range(12)],
        "colour": ["red", "blue"] * 6,
        "product_type": ["shoe", "bag", "top"] * 4,
    })
    columns, chosen = tagging.split_columns(frame, image_columns=["image"])
    assert columns == ["product_type", "colour", "sku"] and chosen == "product_type"
    assert tagging.split_columns(frame, image_columns=["image"], saved="colour")[1] == "colour"
    assert tagging.split_columns(frame, image_columns=["image"], saved="")[1] is None  # "no split" is a choice
    assert tagging.split_columns(frame, image_columns=["image"], saved="gone")[1] == "product_type"


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
        monkeypatch.setenv("CATALOG_LENS_ALLOWED_HOSTS", "127.0.0.1")  # the allow-list, never link-local
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


def test_cancel_stops_a_run_of_trickling_links_within_seconds_and_fetches_no_queued_link(setup, tmp_path, monkeypatch):
    """Every link trickles a byte every 50 ms (20 s each); Cancel after 0.5 s must end the run at once."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests = []

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 400\r\n\r\n")
                for _ in range(400):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CATALOG_LENS_ALLOWED_HOSTS", "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        catalog = tmp_path / "links.csv"
        catalog.write_text("id,image_link\n" + "".join(f"P{i},{base}/p{i}.jpg\n" for i in range(60)))
        folder = tmp_path / "links.run"
        tagging.create_run(folder, catalog_path=catalog, bundle_path=setup["bundle"],
                           options=tagging.TagOptions(image_columns=["image_link"], chunk_rows=20))
        started = time.monotonic()
        summary = tagging.run_tagging(folder, should_cancel=lambda: time.monotonic() - started > 0.5)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
    assert summary.cancelled and elapsed < 8  # before: 20 s per running link, then the next chunks
    assert len(requests) <= 4  # the links running at Cancel (4 per server); none of the queued ones
    assert summary.done == 0  # no row was stored with a "cancelled" download: a resume fetches them


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


# ------------------------------------------------- one reader, one splitter, one parse per run


def _counting_read_sheet(monkeypatch) -> list[str]:
    """Count every read_sheet call, wherever a module bound the name."""
    from core.inputs import sheets

    calls: list[str] = []
    real = sheets.read_sheet

    def counted(*args, **kwargs):
        calls.append(kwargs.get("filename", ""))
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith(("core.", "pages.")) and getattr(module, "read_sheet", None) is real:
            monkeypatch.setattr(module, "read_sheet", counted)
    return calls


EXCEL_SEP = b"sep=;\r\nsku;title;image\r\nA1; Shirt ;person_0.jpg\r\n\r\nA2;Mug;no_person_1.jpg\r\n"
TITLE_LINE = b"Catalogue printemps 2024\r\nsku;title;image\r\nA1; Shirt ;person_0.jpg\r\n\r\nA2;Mug;no_person_1.jpg\r\n"


def _xlsx_with_title() -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Catalogue printemps 2024"])
    sheet.append(["sku", "title", "image"])
    sheet.append(["A1", " Shirt ", "person_0.jpg"])
    sheet.append([None, None, None])
    sheet.append(["A2", "Mug", "no_person_1.jpg"])
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


@pytest.mark.parametrize(("name", "data"), [("excel-sep.csv", EXCEL_SEP), ("title-line.csv", TITLE_LINE),
                                            ("title-line.xlsx", _xlsx_with_title())])
def test_a_sep_line_or_a_title_line_above_the_header_is_read_like_the_preview(setup, tmp_path, name, data):
    """What the Tag page previews (read_sheet) is what the run tags; the lines above the header stay out."""
    catalog = tmp_path / name
    catalog.write_bytes(data)
    out = tmp_path / "tagged.csv"
    assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--images",
                     str(setup["photos"]), "--out", str(out)]) == 0
    delimiter = "," if name.endswith(".xlsx") else ";"
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8-sig")), delimiter=delimiter))
    assert rows[0] == ["sku", "title", "image", "predicted_label", "confidence", "needs_review", "tag_error",
                       "model_id"]
    assert [r[:3] for r in rows[1:]] == [["A1", " Shirt ", "person_0.jpg"], ["", "", ""],
                                         ["A2", "Mug", "no_person_1.jpg"]]  # as written, the blank row kept
    assert rows[1][3] == "person" and rows[3][3] == "no_person"
    assert rows[2][3] == "" and "no photo" in rows[2][6]


def test_several_photos_in_one_cell_are_split_like_the_catalog_reader(setup, tmp_path):
    catalog = tmp_path / "two-photos.csv"
    catalog.write_text("sku,image\nA1,\"person_0.jpg, no_person_1.jpg\"\nA2,no_person_2.jpg\n")
    out = tmp_path / "two-photos-tagged.csv"
    assert cli.main(["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--images",
                     str(setup["photos"]), "--out", str(out), "--rule", "any"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8-sig"))))
    assert rows[0]["image"] == "person_0.jpg, no_person_1.jpg"  # the cell itself is untouched
    assert rows[0]["tag_error"] == "" and rows[0]["predicted_label"] == "person"  # any photo shows a person
    db = out.with_name(out.name + ".run") / "results.db"
    photos = sqlite3.connect(db).execute("SELECT photos FROM results WHERE row = 0").fetchone()[0]
    assert json.loads(photos) == ["person_0.jpg", "no_person_1.jpg"]


def test_the_catalog_is_parsed_once_per_run(setup, monkeypatch):
    """Creating, running and writing the output twice read the catalog file once."""
    from core.projects import workspace

    project = workspace.create_project("Parse once")
    calls = _counting_read_sheet(monkeypatch)
    run_id = tagging.start_project_run(
        project, catalog_name="catalogue.csv", catalog_data=setup["catalog"].read_bytes(),
        bundle_path=setup["bundle"], options=tagging.TagOptions(image_columns=["Photo"]),
        images_dir=setup["photos"])
    folder = tagging.project_run_folder(project, run_id)
    assert tagging.run_tagging(folder).done == setup["rows"]
    tagging.write_output(folder, folder / "out.csv")
    tagging.write_output(folder, folder / "out.xlsx")
    assert calls == ["catalogue.csv"]


def test_a_run_made_before_the_catalog_was_kept_reads_its_copy_once(setup, tmp_path, monkeypatch):
    folder = tagging.create_run(tmp_path / "old.run", catalog_path=setup["catalog"], bundle_path=setup["bundle"],
                                options=tagging.TagOptions(image_columns=["Photo"]), images_dir=setup["photos"])
    (folder / "catalog.json").unlink()  # as left by an older version
    calls = _counting_read_sheet(monkeypatch)
    assert tagging.run_tagging(folder).done == setup["rows"]
    tagging.write_output(folder, tmp_path / "old.csv")
    assert calls == ["catalogue.csv"]
    assert [row[:4] for row in _read(tmp_path / "old.csv")] == _read(setup["catalog"])


# --------------------------------------------------------------------- the Tag page


def _tag_page(project):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.query_params["project"] = project.slug
    at.run()
    at.switch_page("app_pages/steps/tag.py").run()
    assert not at.exception, at.exception
    return at


def test_tag_page_says_why_a_run_cannot_start(setup):
    """An imported model whose file was damaged afterwards: a plain message, not a crash."""
    from core.learning import models
    from core.projects import workspace

    project = workspace.create_project("Damaged model")
    models.import_bundle(project, setup["bundle"])
    model = models.list_models(project)[0]
    Path(model["path"]).write_bytes(b"PK\x03\x04 not a model any more")
    at = _tag_page(project)
    at.file_uploader[0].set_value([("catalog.csv", b"sku,image\nA1,person_0.jpg\n", "text/csv")]).run()
    next(b for b in at.button if b.label == "Start tagging").click().run()
    assert not at.exception, at.exception
    assert at.error and "not a Catalog Lens model" in at.error[0].value
    assert not ProjectState(project).tagging_run and not any(project.path("tagging").iterdir())  # nothing half-made


def test_tag_page_tags_an_excel_sep_catalog_and_its_reruns_do_not_read_the_file(setup, monkeypatch):
    from core.learning import models
    from core.projects import jobs, workspace

    project = workspace.create_project("Excel sep")
    models.import_bundle(project, setup["bundle"])
    at = _tag_page(project)
    at.file_uploader[0].set_value([("excel-sep.csv", EXCEL_SEP, "text/csv")]).run()
    assert at.multiselect[0].value == ["image"]
    next(b for b in at.button if b.label == "Start tagging").click().run()
    assert not at.exception, at.exception
    done = jobs.wait(project, jobs.latest(project, "tag").id, timeout=300)
    assert done.status == "done", done.error
    assert done.result["rows"] == 3  # the photos are not in this project: each row says why
    calls = _counting_read_sheet(monkeypatch)
    at.run()
    assert not at.exception, at.exception
    assert calls == []
    assert {b.label for b in at.get("download_button")} >= {"Download as CSV", "Download as Excel"}


def test_tag_page_review_queue_survives_a_photo_that_cannot_be_decoded(setup):
    """broken.jpg fails to tag, so it waits for review: the queue shows it with the placeholder."""
    from core.learning import models
    from core.projects import workspace

    project = workspace.create_project("Broken photo")
    models.import_bundle(project, setup["bundle"])
    run_id = tagging.start_project_run(
        project, catalog_name="catalog.csv", catalog_data=b"sku,image\nA1,person_0.jpg\nA2,broken.jpg\n",
        bundle_path=setup["bundle"], options=tagging.TagOptions(image_columns=["image"]), images_dir=setup["photos"])
    folder = tagging.project_run_folder(project, run_id)
    assert tagging.run_tagging(folder).failed == 1
    at = _tag_page(project)
    assert any("Row 3" in m.value for m in at.markdown)  # the broken row waits for an answer
    thumbs = tagging.review_thumbnails(folder, [{"row": 0, "photos": ["person_0.jpg"]},
                                                {"row": 1, "photos": ["broken.jpg"]}])
    assert thumbs[0][:3] == b"\xff\xd8\xff" and thumbs[1] == images.placeholder(size=220) != thumbs[0]


def test_tag_page_says_when_most_of_a_catalog_is_unlike_the_training_photos(setup, tmp_path):
    """A model of astronauts, coffee and a cat tags a catalog of rockets, star fields, retinas,
    slides, pages and coins (and two photos like its own): the review list alone would bury
    the point, so the page says first that most tags are guesses and what to do. A catalog
    like the training photos gets no such warning."""
    import shutil

    from skimage import data

    from core.learning import models
    from core.projects import workspace

    folder = tmp_path / "new-photos"
    folder.mkdir()
    unlike_names = ["rocket", "hubble_deep_field", "retina", "immunohistochemistry", "page", "coins"]
    for name in unlike_names:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=85)
    like_names = ["person_3.jpg", "no_person_4.jpg"]
    for name in like_names:
        shutil.copy(setup["photos"] / name, folder / name)
    pages = {}
    for title, names in (("Unlike catalog", [f"{n}.jpg" for n in unlike_names] + like_names),
                         ("Like catalog", like_names)):
        project = workspace.create_project(title)
        models.import_bundle(project, setup["bundle"])
        catalog = "sku,image\n" + "".join(f"S{i},{name}\n" for i, name in enumerate(names))
        run_id = tagging.start_project_run(project, catalog_name="catalog.csv", catalog_data=catalog.encode(),
                                           bundle_path=setup["bundle"], options=tagging.TagOptions(image_columns=["image"]),
                                           images_dir=folder)
        run_folder = tagging.project_run_folder(project, run_id)
        tagging.run_tagging(run_folder)
        pages[title] = (tagging.unlike_rows(tagging.results_frame(run_folder)), _tag_page(project))
    (unlike, tagged), at = pages["Unlike catalog"]
    assert tagged == 8 and unlike >= 5
    said = [w.value for w in at.warning if "unlike the ones the model learned from" in w.value]
    assert said and f"{unlike} of {tagged} tagged rows" in said[0] and "train again" in said[0]
    (unlike, tagged), at = pages["Like catalog"]
    assert tagged == 2 and unlike == 0
    assert not any("unlike the ones the model learned from" in w.value for w in at.warning)


# ------------------------------------------------------------------- runs never collide


def test_two_project_runs_started_in_the_same_second_keep_their_own_catalogs(setup):
    from core.projects import workspace

    project = workspace.create_project("Same second")
    for _ in range(5):
        time.sleep(1.02 - time.time() % 1)  # just after a new second starts
        second = int(time.time())
        ids = [tagging.start_project_run(project, catalog_name=f"{name}.csv",
                                         catalog_data=f"sku,image\n{name},person_0.jpg\n".encode(),
                                         bundle_path=setup["bundle"], options=tagging.TagOptions(image_columns=["image"]))
               for name in ("first", "second")]
        if int(time.time()) == second:
            break
    else:
        pytest.skip("this machine is too slow to start two runs in one second")
    assert ids[0] != ids[1]
    for run_id, name in zip(ids, ("first", "second")):
        folder = tagging.project_run_folder(project, run_id)
        assert tagging.load_run(folder)["catalog_name"] == f"{name}.csv"
        assert name in (folder / tagging.load_run(folder)["catalog"]).read_text()


def _other_model(bundle, dest):
    """The same weights under another model id: another model as far as a run is concerned."""
    import zipfile

    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(dest, "w") as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "bundle.json":
                meta = json.loads(data)
                meta["id"] = "0" * len(meta["id"])
                data = json.dumps(meta).encode()
            out.writestr(item, data)
    return dest


@pytest.mark.parametrize("change", ["catalog", "model"])
def test_resume_refuses_a_run_made_from_another_catalog_or_model(setup, tmp_path, capsys, change):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,image\nA1,person_0.jpg\nA2,no_person_1.jpg\n")
    out = tmp_path / "tagged.csv"
    args = ["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--images", str(setup["photos"]),
            "--out", str(out)]
    assert cli.main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    if change == "catalog":  # same file name, other content
        catalog.write_text("sku,image\nB1,no_person_2.jpg\n")
    else:
        args[2] = str(_other_model(setup["bundle"], tmp_path / "other-model.zip"))
    assert cli.main([*args, "--resume"]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    model_id = tagging.load_run(out.with_name("tagged.csv.run"))["model_id"]
    assert f"tagged.csv belongs to a run of catalog.csv with the model model.zip (id {model_id})" in message
    assert f"{change} given now is a different one" in message
    assert "another --out" in message and "drop --resume" in message
    assert out.read_bytes() == before


def test_resume_goes_on_with_the_same_catalog_under_another_name(setup, tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,image\nA1,person_0.jpg\nA2,no_person_1.jpg\n")
    out = tmp_path / "tagged.csv"
    args = ["tag", "--model", str(setup["bundle"]), "--images", str(setup["photos"]), "--out", str(out)]
    assert cli.main([*args, "--catalog", str(catalog)]) == 0
    copy = tmp_path / "catalog (copy).csv"
    copy.write_bytes(catalog.read_bytes())
    assert cli.main([*args, "--catalog", str(copy), "--resume"]) == 0


# ------------------------------------------------------------- no cell runs as a formula


def _text_cells_xlsx(rows: list[list[str]]) -> bytes:
    """A workbook whose cells are text cells, even those starting with "=" (as Excel keeps '=1+1 typed as text)."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    for r, values in enumerate(rows, start=1):
        for c, value in enumerate(values, start=1):
            cell = sheet.cell(r, c, value)
            cell.data_type = "s"
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


HOSTILE_CATALOG = [
    ["sku", "=title()", "image", "note"],
    ["A1", "=1+1", "person_0.jpg", '=HYPERLINK("http://evil.example/x","Click me")'],
    ["A2", "@SUM(A1:A2)", "=1+2.jpg", "-2"],
    ["A3", "+cmd|' /C calc'!A0", "no_person_1.jpg", "\tx"],
]


def test_formula_cells_come_back_as_text_in_every_output(setup, tmp_path):
    """Catalog cells, a file name and an answer starting with = + - @ or tab never run as formulas."""
    import openpyxl
    import pandas as pd

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("person_0.jpg", "no_person_1.jpg"):
        (photos / name).write_bytes((setup["photos"] / name).read_bytes())
    (photos / "=1+2.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")  # its tag_error starts with its name
    catalog = tmp_path / "hostile.xlsx"
    catalog.write_bytes(_text_cells_xlsx(HOSTILE_CATALOG))
    args = ["tag", "--model", str(setup["bundle"]), "--catalog", str(catalog), "--images", str(photos),
            "--image-column", "image"]
    for suffix in ("xlsx", "csv", "parquet"):
        assert cli.main([*args, "--out", str(tmp_path / f"tagged.{suffix}")]) == 0

    book = openpyxl.load_workbook(tmp_path / "tagged.xlsx")
    sheet = book.active
    for r, values in enumerate(HOSTILE_CATALOG, start=1):
        cells = [sheet.cell(r, c) for c in range(1, 5)]
        assert [c.value for c in cells] == values  # exactly as written
        assert {c.data_type for c in cells} == {"s"}  # text, never a formula
    error = [c for c in sheet[3] if isinstance(c.value, str) and c.value.startswith("=1+2.jpg:")]
    assert error and error[0].data_type == "s"
    with zipfile.ZipFile(tmp_path / "tagged.xlsx") as z:
        assert "<f>" not in z.read("xl/worksheets/sheet1.xml").decode()

    rows = list(csv.reader(io.StringIO((tmp_path / "tagged.csv").read_text(encoding="utf-8-sig"), newline="")))
    assert rows[0][:4] == ["sku", "'=title()", "image", "note"]
    assert rows[1][1] == "'=1+1" and rows[1][3] == "'" + HOSTILE_CATALOG[1][3]
    assert rows[2][1] == "'@SUM(A1:A2)" and rows[2][2] == "'=1+2.jpg" and rows[2][3] == "-2"  # a number stays
    assert rows[3][1] == "'+cmd|' /C calc'!A0" and rows[3][3] == "'\tx"
    assert rows[2][7].startswith("'=1+2.jpg:")  # tag_error, written by the app
    assert all(not cell.startswith(("=", "+", "@", "\t", "\r")) for row in rows for cell in row)

    back = pd.read_parquet(tmp_path / "tagged.parquet")  # typed data: values as they are
    assert back.iloc[:, :4].values.tolist() == HOSTILE_CATALOG[1:]
    assert back["predicted_label"].iloc[0] in {"person", "no_person"}

    folder = tmp_path / "tagged.csv.run"  # an answer (a class name from a label sheet) goes through the same helper
    tagging.write_output(folder, tmp_path / "answered.csv", overrides={0: "@SUM(1+1)"})
    answered = list(csv.reader(io.StringIO((tmp_path / "answered.csv").read_text(encoding="utf-8-sig"), newline="")))
    assert answered[1][4] == "'@SUM(1+1)"


def test_tag_and_data_pages_take_the_same_sheet_types_and_say_what_to_do_with_an_old_xls(setup):
    """One list (core.inputs.sheets.SHEET_TYPES) for both uploaders: an .xls gets in and is answered in words."""
    from core.inputs import sheets
    from core.learning import models
    from core.projects import workspace

    project = workspace.create_project("Old Excel")
    models.import_bundle(project, setup["bundle"])
    at = _tag_page(project)
    assert list(at.file_uploader[0].proto.type) == [f".{t}" for t in sheets.SHEET_TYPES]
    data_page = _tag_page(project)
    data_page.switch_page("app_pages/steps/data.py").run()
    assert list(data_page.file_uploader[1].proto.type) == [f".{t}" for t in sheets.SHEET_TYPES]
    old = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)  # the header of an Excel 97-2003 workbook
    at.file_uploader[0].set_value([("catalog.xls", old, "application/vnd.ms-excel")]).run()
    assert not at.exception, at.exception
    assert "old-style Excel file" in at.error[0].value and "xlsx" in at.error[0].value


# ------------------------------------------------------------ class names in the download


def _named_model(setup, dest: Path) -> Path:
    """The setup's model with readable names for its classes, as the Data page gives them."""
    from core.learning import bundles

    bundle, arrays = bundles.load_bundle(setup["bundle"])
    bundle.class_display_names = {"person": "Model in shot", "no_person": "No model"}
    return bundles.save_bundle(bundle, arrays, dest)


@pytest.mark.parametrize("tags_as", ["names", "codes"])
def test_the_download_carries_the_class_names_or_the_codes(setup, tmp_path, tags_as):
    model = _named_model(setup, tmp_path / "named.zip")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,image\nA1,person_0.jpg\nA2,no_person_1.jpg\nA3,gone.jpg\n")
    out = tmp_path / "tagged.csv"
    assert cli.main(["tag", "--model", str(model), "--catalog", str(catalog), "--images", str(setup["photos"]),
                     "--out", str(out), "--tags-as", tags_as]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_bytes().decode("utf-8-sig"))))
    if tags_as == "names":
        assert list(rows[0])[:4] == ["sku", "image", "predicted_label", "predicted_code"]
        assert [(r["predicted_label"], r["predicted_code"]) for r in rows] == [
            ("Model in shot", "person"), ("No model", "no_person"), ("", "")]
    else:
        assert "predicted_code" not in rows[0]
        assert [r["predicted_label"] for r in rows] == ["person", "no_person", ""]
    folder = out.with_name("tagged.csv.run")  # the analyst's answers are written the same way
    tagging.write_output(folder, tmp_path / "answered.xlsx", overrides={2: "person"}, tags_as=tags_as,
                         names={"person": "Person in photo"})
    import pandas as pd

    answered = pd.read_excel(tmp_path / "answered.xlsx", dtype=str).fillna("")
    assert answered.loc[2, "predicted_label"] == ("Person in photo" if tags_as == "names" else "person")
    assert answered.loc[2, "needs_review"] == "reviewed"


def test_tag_page_offers_names_or_codes_for_the_download(setup, tmp_path):
    from core.learning import models
    from core.projects import workspace

    project = workspace.create_project("Named classes")
    models.import_bundle(project, _named_model(setup, tmp_path / "named.zip"))
    project.set_class_names({"person": "Model in shot", "no_person": "No model"})
    run_id = tagging.start_project_run(
        project, catalog_name="catalog.csv", catalog_data=b"sku,image\nA1,person_0.jpg\nA2,no_person_1.jpg\n",
        bundle_path=Path(models.list_models(project)[0]["path"]), options=tagging.TagOptions(image_columns=["image"]),
        images_dir=setup["photos"])
    tagging.run_tagging(tagging.project_run_folder(project, run_id))
    at = _tag_page(project)
    choice = at.radio(key="tags-as")
    assert choice.value == "names" and "Model in shot" in choice.options[0] and "“person”" in choice.options[1]
    choice.set_value("codes").run()
    assert not at.exception, at.exception
