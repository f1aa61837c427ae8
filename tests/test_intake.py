"""core.projects.intake: uploads staged while a check runs are never left behind."""

from __future__ import annotations

import io
import threading
import zipfile

import numpy as np
from PIL import Image

from core import tasks  # noqa: F401  (the intake job's handler)
from core.projects import intake, jobs, workspace


def _zip(prefix: str, n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            img = io.BytesIO()
            Image.fromarray(np.full((24, 32, 3), (i * 40 + len(prefix) * 7) % 255, np.uint8)).save(img, "JPEG")
            zf.writestr(f"{prefix}-{i}.jpg", img.getvalue())
    return buf.getvalue()


def test_a_second_upload_staged_while_intake_runs_is_processed(monkeypatch):
    """The page stages a second zip and submits intake again while the first check runs:
    submit returns the running job, which must not leave the second zip staged forever."""
    project = workspace.create_project("Two uploads")
    started, release = threading.Event(), threading.Event()
    real = intake.images.inspect_image

    def slow_first(path):
        if not started.is_set():
            started.set()
            assert release.wait(30)
        return real(path)

    monkeypatch.setattr(intake.images, "inspect_image", slow_first)
    intake.stage_upload(project, filename="first.zip", data=_zip("a", 3))
    job = jobs.submit(project, "intake", start=False)
    worker = threading.Thread(target=jobs.run, args=(project, job.id))
    worker.start()
    assert started.wait(30)
    intake.stage_upload(project, filename="second.zip", data=_zip("bb", 4))
    again = jobs.submit(project, "intake", start=False)
    release.set()
    worker.join(60)
    if again.id != job.id:  # a new job was queued: it must get the second zip
        jobs.run(project, again.id)
    names = set(project.names()["name"])
    assert {f"a-{i}.jpg" for i in range(3)} | {f"bb-{i}.jpg" for i in range(4)} <= names
    assert project.uploads(status="staged").empty


def _hostile_folder(folder):
    """The hostile folder of issue 11: an empty file, text named .jpg, a truncated JPEG, a
    60000×60000 PNG (a decompression bomb: tiny file, 10 GB of pixels), an SVG named .png,
    good photos, and a sheet that also names a photo that is not there."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    folder.mkdir()
    for i in range(3):
        for label, colour in (("red", (200, 30, 40)), ("blue", (20, 40, 200))):
            Image.new("RGB", (64, 48), tuple(c + 10 * i for c in colour)).save(folder / f"{label}{i}.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("hello, this is not a photo\n")
    (folder / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"junk" * 50)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    (folder / "drawing.png").write_text('<svg xmlns="http://www.w3.org/2000/svg"><text>hi</text></svg>')
    rows = [f"{c}{i}.jpg,{c}" for c in ("red", "blue") for i in range(3)]
    rows += ["empty.jpg,red", "notes.jpg,blue", "cut.jpg,red", "bomb.png,blue", "drawing.png,red", "absent.jpg,blue"]
    sheet = folder.parent / "labels.csv"
    sheet.write_text("file,label\n" + "\n".join(rows) + "\n")
    return sheet


def test_cli_intake_json_on_a_hostile_folder_names_every_bad_file(tmp_path, workspace_home):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    sheet = _hostile_folder(tmp_path / "photos")
    done = subprocess.run(
        [sys.executable, "-m", "core", "intake", "--project", "Hostile", "--images", str(tmp_path / "photos"),
         "--labels", str(sheet), "--json"],
        cwd=REPO, env=dict(os.environ, CATALOG_LENS_HOME=str(workspace_home)), capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["photos"] == 6 and result["matched"] == 6 and result["per_class"] == {"red": 3, "blue": 3}
    reasons = {p["item"]: p["reason"] for p in result["problems"] if p["severity"] == "error"}
    assert "empty (0 bytes)" in reasons["empty.jpg"]
    assert "not an image" in reasons["notes.jpg"] and "text file" in reasons["notes.jpg"]
    assert "cut short" in reasons["cut.jpg"]
    assert "too large" in reasons["bomb.png"] and "60000×60000" in reasons["bomb.png"]
    assert "vector drawing (SVG)" in reasons["drawing.png"]
    rows = {p["item"]: p["reason"] for p in result["problems"] if p["item"].startswith("row ")}
    assert "absent.jpg" in rows["row 13 labels.csv"]  # the row naming a photo that is not there


def test_a_big_sheet_stores_a_summary_and_the_download_has_every_row():
    import csv

    project = workspace.create_project("Big sheet")
    intake.stage_upload(project, filename="photos.zip", data=_zip("a", 2))
    job = jobs.submit(project, "intake", start=False)
    assert jobs.run(project, job.id).status == "done"
    sheet = "file,label\na-0.jpg,cat\na-1.jpg,dog\n" + "".join(f"gone-{i}.jpg,cat\n" for i in range(3000))
    intake.apply_sheet(project, filename="big.csv", data=sheet.encode())
    stored = project.problems()
    assert (stored["kind"] == "missing_photo").sum() == 21  # 20 rows + one line counting the rest
    full = list(csv.DictReader(io.StringIO(intake.problem_list_csv(project).decode("utf-8-sig"))))
    missing = [r for r in full if r["kind"] == "missing_photo"]
    assert len(missing) == 3000 and missing[-1]["row"] == "3003" and "gone-2999.jpg" in missing[-1]["message"]
    assert set(stored["kind"]) <= {r["kind"] for r in full}  # the notes and blockers too
