"""Bringing photos and label sheets into a project.

Uploads are first *staged* (their bytes written to the project's ``staging/`` folder as
they arrive), then checked by a background job that unpacks zips, decodes every photo,
stores the good ones by content hash and records a plain problem for each file it could
not use. The label sheet is kept in the project and matched again whenever new photos
arrive, so the order in which the analyst uploads things does not matter.
"""

from __future__ import annotations

import csv
import re
import shutil
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from core.base import exports
from core.base.files import atomic_file, atomic_write_bytes, sha256_file
from core.base.problems import InputError, Problem
from core.inputs import images, labels, sheets, uploads
from core.inputs.columns import guess_columns, guess_group_column
from core.projects.workspace import Project

JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
# A sheet inside a photo zip is used as the label sheet; a readme.txt there is not one.
SHEET_SUFFIXES = {f".{t}" for t in sheets.SHEET_TYPES if t != "txt"}


def _safe_filename(filename: str) -> str:
    name = unicodedata.normalize("NFC", Path(filename.replace("\\", "/")).name)
    name = re.sub(r"[\x00-\x1f/]", "_", name).strip() or "upload"
    return name[-120:]


def stage_upload(project: Project, *, filename: str, data: bytes | BinaryIO) -> str:
    """Write one uploaded file (photo or zip) to the project's staging area; returns its id."""
    upload_id = f"up-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
    dest = project.path("staging", upload_id, _safe_filename(filename))
    if isinstance(data, (bytes, bytearray, memoryview)):
        atomic_write_bytes(dest, bytes(data))
    else:
        with atomic_file(dest) as out:
            shutil.copyfileobj(data, out, length=1 << 20)
    kind = "zip" if uploads.is_zip(dest) else "photo"
    project.record_upload(upload_id, filename=filename, kind=kind, staged_path=dest)
    return upload_id


def stage_folder(project: Project, folder: Path) -> str:
    """Register a local folder of photos (command line) to be read in place."""
    upload_id = f"dir-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
    project.record_upload(upload_id, filename=folder.name, kind="folder", staged_path=folder.resolve())
    return upload_id


def _folder_files(folder: Path) -> tuple[list[uploads.UploadedFile], int]:
    files, junk = [], 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            junk += path.is_file()
            continue
        if path.is_file() and not path.is_symlink():
            files.append(uploads.UploadedFile(unicodedata.normalize("NFC", rel.as_posix()), path))
    return files, junk


def _sheet_in_upload(project: Project, item: uploads.UploadedFile) -> Problem:
    """A label sheet that came inside a zip is used when the project has none yet."""
    if sheet_state(project) is not None:
        return Problem("sheet_in_zip_ignored", f"{item.name} looks like a label sheet; it was not used because "
                       "the project already has one. Upload it as the label sheet to replace it.",
                       file=item.name, severity="warning")
    try:
        apply_sheet(project, filename=Path(item.name).name, data=item.path.read_bytes())
    except InputError as exc:
        return Problem("bad_sheet", f"{item.name}: {exc}", file=item.name)
    return Problem("sheet_from_zip", f"{item.name} was found in the upload and used as the label sheet.",
                   file=item.name, severity="info")


@dataclass
class IntakeSummary:
    files_seen: int = 0
    photos_added: int = 0
    photos_known: int = 0
    problems: int = 0
    junk_skipped: int = 0
    per_upload: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "files_seen": self.files_seen,
            "photos_added": self.photos_added,
            "photos_known": self.photos_known,
            "problems": self.problems,
            "junk_skipped": self.junk_skipped,
            "per_upload": self.per_upload,
        }


def process_staged(
    project: Project,
    *,
    on_progress: Callable[[int, int, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> IntakeSummary:
    """Check and store every staged upload, including any staged while this runs (it
    loops until nothing is left); safe to run again after an interruption."""
    summary = IntakeSummary()
    while not (staged := project.uploads(status="staged")).empty:
        if not _process(project, staged, summary, on_progress=on_progress, should_cancel=should_cancel):
            return summary
    rematch(project)
    return summary


def _process(project: Project, staged: pd.DataFrame, summary: IntakeSummary, *, on_progress, should_cancel) -> bool:
    """Check one batch of staged uploads into ``summary``; False when cancelled."""
    plan: list[tuple[str, str, list[uploads.UploadedFile], list[Problem], int]] = []
    for row in staged.itertuples():
        path = Path(row.staged_path) if row.staged_path else None
        if path is None or not path.exists():
            project.finish_upload(row.id, {"error": "the uploaded file was lost before it was checked"})
            continue
        if path.is_dir():
            files, junk = _folder_files(path)
            plan.append((row.id, row.filename, files, [], junk))
        elif uploads.is_zip(path):
            result = uploads.unpack_zip(path, path.parent / "unpacked", archive_name=row.filename)
            plan.append((row.id, row.filename, result.files, list(result.problems), result.junk_skipped))
        else:
            plan.append((row.id, row.filename, [uploads.UploadedFile(_safe_filename(row.filename), path)], [], 0))
    total = sum(len(files) for _, _, files, _, _ in plan)
    done = 0
    name_of_sha = {sha: name for name, sha in project.query("SELECT name, sha FROM names")}
    for upload_id, filename, files, problems, junk in plan:
        added = known = 0
        for item in files:
            if should_cancel and should_cancel():
                return False
            base = Path(item.name).name.casefold()
            if base in JUNK_NAMES or base.startswith("._"):
                junk += 1
            elif Path(base).suffix in SHEET_SUFFIXES:
                problems.append(_sheet_in_upload(project, item))
            else:
                try:
                    info = images.inspect_image(item.path)
                except images.ImageError as exc:
                    problems.append(Problem("unreadable_image", f"{item.name}: {exc}", file=item.name))
                else:
                    sha = sha256_file(item.path)
                    twin = name_of_sha.get(sha)
                    twin = twin if twin != item.name else None
                    _, stored = project.add_image(
                        item.path,
                        name=item.name,
                        upload=upload_id,
                        sha=sha,
                        info={"width": info.width, "height": info.height, "format": info.format},
                    )
                    name_of_sha.setdefault(sha, item.name)
                    if stored:
                        added += 1
                    else:
                        known += 1
                        if twin:
                            problems.append(Problem(
                                "duplicate_photo",
                                f"{item.name} is the same photo as {twin} (identical bytes); "
                                "it is stored and trained on once.",
                                file=item.name, severity="info"))
            done += 1
            if on_progress:
                on_progress(done, total, f"Checking {filename}")
        project.replace_problems(upload_id, problems)
        upload_summary = {
            "filename": filename,
            "files": len(files),
            "added": added,
            "already_there": known,
            "problems": sum(p.severity == "error" for p in problems),
            "junk_skipped": junk,
        }
        project.finish_upload(upload_id, upload_summary)
        shutil.rmtree(project.root / "staging" / upload_id, ignore_errors=True)
        summary.files_seen += len(files)
        summary.photos_added += added
        summary.photos_known += known
        summary.problems += upload_summary["problems"]
        summary.junk_skipped += junk
        summary.per_upload[upload_id] = upload_summary
    return True


# ------------------------------------------------------------------------- sheets


@dataclass(frozen=True)
class SheetState:
    """The project's current label sheet and the columns used from it."""

    filename: str
    stored: str
    image_column: str | None
    label_column: str | None
    columns: tuple[str, ...]
    group_column: str | None = None  # which product each photo shows (photos kept together when testing)


def sheet_state(project: Project) -> SheetState | None:
    meta = project.get_meta("sheet")
    if not meta:
        return None
    return SheetState(
        meta["filename"], meta["stored"], meta.get("image_column"), meta.get("label_column"),
        tuple(meta.get("columns", ())), meta.get("group_column") or None,
    )


def apply_sheet(
    project: Project,
    *,
    filename: str,
    data: bytes | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
) -> labels.MatchResult | None:
    """Keep a new label sheet (or change the columns used) and match it to the photos.

    ``group_column`` names the product/group column (None: guessed, "": the sheet has none).
    Raises :class:`InputError` with a plain message when the sheet cannot be read at all.
    """
    if data is not None:
        sheet = labels.read_sheet(data, filename=filename, photo_names=_photo_names(project))
        stored = project.path("sheets", f"sheet{Path(filename).suffix.lower() or '.csv'}")
        for old in stored.parent.glob("sheet.*"):
            old.unlink()
        atomic_write_bytes(stored, data)
    else:
        state = sheet_state(project)
        if state is None:
            raise InputError("Upload a label sheet first.")
        stored = Path(state.stored)
        sheet = labels.read_sheet(stored.read_bytes(), filename=state.filename, photo_names=_photo_names(project))
    guessed_image, guessed_label = guess_columns(sheet)
    image_column = image_column or guessed_image
    label_column = label_column or guessed_label
    if group_column is None:
        group_column = guess_group_column(sheet, image_column=image_column, label_column=label_column)
    columns = [str(c) for c in sheet.frame.columns]
    for chosen, what in ((image_column, "photo file names"), (label_column, "labels"), (group_column or None, "products")):
        if chosen is not None and chosen not in columns:
            raise InputError(f"The sheet has no column '{chosen}' for the {what}. Its columns: {', '.join(columns)}.")
    project.set_meta("sheet", {
        "filename": filename,
        "stored": str(stored),
        "image_column": image_column,
        "label_column": label_column,
        "group_column": group_column or "",
        "columns": columns,
        "rows": len(sheet.frame),
        "at": time.time(),
    })
    return rematch(project, sheet=sheet)


def rematch(project: Project, *, sheet: labels.Sheet | None = None) -> labels.MatchResult | None:
    """Match the kept sheet to the photos now in the project and store the labels."""
    state = sheet_state(project)
    if state is None:
        return None
    if sheet is None:
        try:
            sheet = labels.read_sheet(Path(state.stored).read_bytes(), filename=state.filename,
                                      photo_names=_photo_names(project))
        except (InputError, OSError) as exc:
            project.replace_problems("sheet", [Problem("bad_sheet", f"{state.filename}: {exc}", file=state.filename)])
            return None
    if not state.image_column or not state.label_column:
        project.replace_problems("sheet", [Problem(
            "columns_unknown",
            f"{state.filename}: choose which column holds the photo file names and which holds the labels.",
            file=state.filename)])
        return None
    names = _photo_names(project)
    # Every row's problem goes to a file (the download); the database keeps the summary.
    with atomic_file(_full_list(project), "w") as out:
        writer = csv.writer(out)
        writer.writerow(_LIST_COLUMNS)
        result = labels.match_labels(
            sheet, image_column=state.image_column, label_column=state.label_column,
            image_names=names,
            on_problem=lambda p: writer.writerow([p.severity, p.kind, p.file, p.row, p.message]),
        )
    project.set_sheet_labels(result.labels)
    _store_groups(project, sheet, state, names)
    problems = list(result.problems)
    training = project.training_set()
    problems += labels.training_blockers(dict(zip(training["sha"], training["label"])))
    project.replace_problems("sheet", problems)
    project.set_meta("sheet_match", {
        "rows_total": result.rows_total,
        "rows_matched": result.rows_matched,
        "rows_unmatched": result.rows_unmatched,
        "images_unlabelled": len(result.images_unlabelled),
    })
    return result


_LIST_COLUMNS = ("severity", "kind", "file", "row", "message")


def _photo_names(project: Project) -> list[str]:
    return [n for (n,) in project.query("SELECT name FROM names")]


def _full_list(project: Project) -> Path:
    return project.path("sheets", "sheet-problems.csv")


def problem_list_csv(project: Project) -> bytes:
    """Every problem as a CSV (for the download): each sheet row's problem, not the summary
    the page shows, and those of the photos."""
    problems = project.problems()
    full = _full_list(project)
    if full.is_file() and sheet_state(project) is not None:
        rows = pd.read_csv(full, dtype=str, keep_default_na=False)
        sheet_summary = problems[(problems["scope"] == "sheet")]
        notes = sheet_summary[~sheet_summary["kind"].isin(set(rows["kind"]))]  # notes, blockers
        problems = pd.concat([problems[problems["scope"] != "sheet"], notes, rows], ignore_index=True)
    return exports.csv_bytes(problems[list(_LIST_COLUMNS)])  # no cell runs as a formula


def _store_groups(project: Project, sheet: labels.Sheet, state: SheetState, names: list[str]) -> None:
    # The group column is matched to the photos like the labels are; its problems are the
    # label column's, already reported, so only the photo -> product values are kept.
    column = state.group_column
    groups: dict[str, str] = {}
    if column and column in sheet.frame.columns and column not in (state.image_column, state.label_column):
        by_name = labels.match_labels(sheet, image_column=state.image_column, label_column=column,
                                      image_names=names).labels
        sha_of = dict(project.query("SELECT name, sha FROM names"))
        for name, value in by_name.items():
            groups.setdefault(sha_of[name], value)
    project.set_meta("photo_groups", {"column": column if groups else "", "groups": groups})


def photo_groups(project: Project) -> tuple[str | None, dict[str, str]]:
    """The label sheet's product column and each photo's value in it (photo id -> product),
    or ``(None, {})`` when the sheet has no such column."""
    stored = project.get_meta("photo_groups") or {}
    return stored.get("column") or None, dict(stored.get("groups", {}))


def refresh_blockers(project: Project) -> list[Problem]:
    """Training blockers for the labels as they are now (after manual fixes)."""
    training = project.training_set()
    return labels.training_blockers(dict(zip(training["sha"], training["label"])))


# ----------------------------------------------------------------- data overview


def data_summary(project: Project) -> dict:
    """Counts for the Data page and the command line.

    Counts are of uploaded files, as the analyst knows them (480 files, 248 "person"); two
    files with identical bytes are one photo for training, reported as ``duplicate_files``.
    """
    ds = project.dataset()
    problems = project.problems()
    labelled = ds[(ds["label"] != "") & ~ds["excluded"]]
    return {
        "photos": int(ds["names"].sum()),
        "unique_photos": len(ds),
        "duplicate_files": int((ds["names"] - 1).sum()),
        "labelled": int(labelled["names"].sum()),
        "unlabelled": int(ds.loc[ds["label"] == "", "names"].sum()),
        "conflicts": int((ds["label_source"] == "conflict").sum()),
        "excluded": int(ds.loc[ds["excluded"], "names"].sum()),
        "classes": {str(k): int(v) for k, v in labelled.groupby("label")["names"].sum().sort_index().items()},
        "errors": int((problems["severity"] == "error").sum()),
        "warnings": int((problems["severity"] == "warning").sum()),
        "match": project.get_meta("sheet_match"),
    }


def review_table(project: Project) -> pd.DataFrame:
    """Every photo with its label and exclusion, as the analyst edits them."""
    ds = project.dataset()
    return ds[["sha", "name", "label", "label_source", "excluded"]].reset_index(drop=True)


def apply_fixes(project: Project, before: pd.DataFrame, after: pd.DataFrame) -> int:
    """Store the rows the analyst changed as manual fixes; returns how many changed."""
    merged = before.merge(after[["sha", "label", "excluded"]], on="sha", suffixes=("_old", ""))
    changed = merged[(merged["label"].fillna("") != merged["label_old"].fillna(""))
                     | (merged["excluded"] != merged["excluded_old"])]
    for row in changed.itertuples():
        label = (row.label or "").strip()
        project.set_override(row.sha, label=label or None, excluded=bool(row.excluded))
    if len(changed):
        rematch(project)
    return len(changed)
