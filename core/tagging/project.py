"""Tagging runs kept in a project: the Tag page's and the demo's, each in its own folder."""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from core.base.files import atomic_write_bytes
from core.projects.state import ProjectState
from core.tagging.output import overrides, review_photos
from core.tagging.run import TagOptions, create_run, results_frame

__all__ = ["add_reviews_to_training", "out_of_date", "project_run_folder", "start_project_run"]


def out_of_date(run: dict, model: dict | None) -> str | None:
    """How a run's tags differ from what ``model`` (the one chosen for tagging now, an entry of
    :func:`core.learning.models.list_models`) would give: "with another model", "at another
    confidence setting (50 %)", or None when they are its tags."""
    if model is None:
        return None
    if run.get("model_id") != model["id"]:
        return "with another model"
    then, now = run.get("threshold"), model["threshold"]
    if then is not None and now is not None and abs(then - now) > 1e-6:
        return f"at another confidence setting ({100 * then:.0f} %)"
    return None


def project_run_folder(project, run_id: str) -> Path:
    return project.path("tagging", run_id)


def _new_run_folder(project) -> tuple[str, Path]:
    """A folder no other run has: the id sorts by time, and its random tail keeps two runs
    started in the same second apart (the folder is made exclusively, never reused)."""
    parent = project.path("tagging")
    while True:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            (parent / run_id).mkdir()
        except FileExistsError:
            continue
        return run_id, parent / run_id


def start_project_run(project, *, catalog_name: str, catalog_data: bytes, bundle_path: Path,
                      options: TagOptions, zip_data: bytes | None = None, images_dir: Path | None = None,
                      threshold: float | None = None) -> str:
    """Keep an uploaded catalog (and its photo zip) in the project and prepare a run; returns its id.

    ``images_dir`` (command line only) is a folder on this computer read in place for the photos;
    ``threshold`` the confidence the model needs to tag (see :func:`core.tagging.run.create_run`).
    Raises InputError (nothing is kept then) when the catalog or the model cannot be used.
    """
    run_id, folder = _new_run_folder(project)
    try:
        upload = folder / "upload"
        upload.mkdir()
        catalog_path = upload / (Path(catalog_name).name or "catalog.csv")
        atomic_write_bytes(catalog_path, catalog_data)
        zip_path = None
        if zip_data:
            zip_path = upload / "photos.zip"
            atomic_write_bytes(zip_path, zip_data)
        create_run(folder, catalog_path=catalog_path, bundle_path=bundle_path, options=options, images_zip=zip_path,
                   images_dir=Path(images_dir).resolve() if images_dir else None, threshold=threshold)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    ProjectState(project).set_tagging_run(run_id)
    return run_id


def add_reviews_to_training(project, folder: Path) -> int:
    """Add the reviewed rows' photos, with the analyst's answers, to the project's labels."""
    fixed = overrides(folder)
    if not fixed:
        return 0
    results = results_frame(folder)
    items = [{"row": row, "photos": json.loads(results.loc[row, "photos"] or "[]")} for row in fixed if row in results.index]
    paths = review_photos(folder, items, project)
    added = 0
    for item in items:
        path = paths.get(item["row"])
        if path is None:
            continue
        sha, _ = project.add_image(path, name=f"tagging/{Path(item['photos'][0]).name}", upload=f"tagging:{folder.name}")
        project.set_override(sha, label=fixed[item["row"]])
        added += 1
    return added
