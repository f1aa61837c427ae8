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
