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
