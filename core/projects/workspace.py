"""Projects on disk: SQLite metadata (WAL) plus content-addressed files.

A project is one folder under the workspace home::

    <home>/projects/<slug>/
        project.db          metadata: photos, names, labels, problems, jobs (SQLite, WAL)
        images/ab/<sha>.jpg every photo stored once, named by the SHA-256 of its bytes
        thumbs/ab/<sha>.jpg small JPEG previews for the UI, made on demand
        sheets/             the label sheet as uploaded
        staging/            uploads waiting to be checked by the intake job
        features/           cached CNN features (see core.vision.features)
        models/             trained model bundles
        logs/               background job logs

Everything a user does is written here at once, so a browser refresh, a closed tab or a
server restart loses nothing. Several browser sessions (and background job processes)
may open the same project: SQLite in WAL mode serialises the writes, and files are
written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.base.files import atomic_copy, atomic_write_bytes, atomic_write_text, sha256_file
from core.base.problems import InputError, Problem
from core.inputs.images import ImageError, make_thumbnail, placeholder

HOME_ENV = "CATALOG_LENS_HOME"
_DEFAULT_HOME = Path(__file__).resolve().parents[2] / "workspace"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    sha TEXT PRIMARY KEY, ext TEXT NOT NULL, bytes INTEGER NOT NULL,
    width INTEGER, height INTEGER, format TEXT, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, sha TEXT NOT NULL REFERENCES images(sha),
    upload TEXT, added_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS names_sha ON names(sha);
CREATE TABLE IF NOT EXISTS sheet_labels (name TEXT PRIMARY KEY, label TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS overrides (
    sha TEXT PRIMARY KEY, label TEXT, excluded INTEGER NOT NULL DEFAULT 0, updated_at REAL);
CREATE TABLE IF NOT EXISTS classes (label TEXT PRIMARY KEY, display TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS problems (
    id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, file TEXT, row INTEGER, severity TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS problems_scope ON problems(scope);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, kind TEXT NOT NULL, staged_path TEXT,
    status TEXT NOT NULL, summary TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, message TEXT,
    pid INTEGER, cancel INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT,
    created_at REAL NOT NULL, started_at REAL, updated_at REAL, finished_at REAL,
    again INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs(kind, created_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL, at REAL NOT NULL, payload TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id, at);
"""


# Columns added to tables of existing projects since their database was made.
_ADDED_COLUMNS = {"jobs": {"again": "INTEGER NOT NULL DEFAULT 0"}}


def _migrate(con: sqlite3.Connection) -> None:
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if name not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def home() -> Path:
    """The workspace folder: ``$CATALOG_LENS_HOME`` or ``./workspace`` beside the code."""
    return Path(os.environ.get(HOME_ENV) or _DEFAULT_HOME).expanduser().resolve()


def projects_dir() -> Path:
    path = home() / "projects"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------ projects


def slugify(name: str) -> str:
    """A folder- and URL-safe id for a project name ("Summer shoes 2026" → "summer-shoes-2026")."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()
    return text[:48] or "project"


@dataclass(frozen=True)
class ProjectInfo:
    slug: str
    name: str
    created_at: float


def list_projects() -> list[ProjectInfo]:
    """All projects in the workspace, newest first."""
    infos = []
    for folder in projects_dir().iterdir():
        if not folder.name.startswith(".") and (folder / "project.db").is_file():  # not drafts nor trash
            try:
                project = Project(folder.name)
                infos.append(ProjectInfo(folder.name, project.name, project.created_at))
            except sqlite3.Error:
                continue
    return sorted(infos, key=lambda info: info.created_at, reverse=True)


def last_project() -> str | None:
    """The slug of the project opened last (in any session), if it still exists."""
    path = home() / "last_project"
    slug = path.read_text().strip() if path.is_file() else ""
    return slug if slug and (projects_dir() / slug / "project.db").is_file() else None


def remember_last_project(slug: str | None) -> None:
    """Open this project next time a session starts without one (None forgets)."""
    path = home() / "last_project"
    if slug:
        atomic_write_text(path, slug)
    else:
        path.unlink(missing_ok=True)


def create_project(name: str) -> Project:
    """Create an empty project; the slug gets a number when the name is taken.

    The project is built in a hidden folder and renamed into place in one step, so two
    creates at the same moment (two tabs, two command lines) each get their own slug, and
    no half-made project is ever listed."""
    name = " ".join(name.split())
    if not name:
        raise InputError("Give the project a name, for example 'Person in photo'.")
    if len(name) > 80:
        raise InputError("Keep the project name under 80 characters.")
    base = slugify(name)
    draft = f".new-{uuid.uuid4().hex}"
    try:
        made = Project(draft)
        made.set_meta("name", name)
        made.set_meta("created_at", time.time())
        for n in range(1, 10_000):
            slug = base if n == 1 else f"{base}-{n}"
            try:  # mkdir claims the slug atomically; then the finished project replaces it
                (projects_dir() / slug).mkdir()
            except FileExistsError:
                continue
            os.replace(made.root, projects_dir() / slug)
            return Project(slug)
    except OSError as exc:
        raise InputError(f"The project '{name}' could not be created in {projects_dir()}: "
                         f"{exc.strerror or exc}. Check that the folder is writable and has free space.") from exc
    finally:
        shutil.rmtree(projects_dir() / draft, ignore_errors=True)
    raise InputError(f"Too many projects are named '{name}': choose another name.")


def open_project(slug: str) -> Project:
    """Open an existing project by its slug."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", slug or "") or not (
        projects_dir() / slug / "project.db"
    ).is_file():
        raise InputError(f"There is no project '{slug}' in this workspace.")
    return Project(slug)


def delete_project(slug: str) -> None:
    """Delete a project and all its files (the UI asks for confirmation first)."""
    project = open_project(slug)
    trash = projects_dir() / f".deleted-{slug}-{int(time.time())}"
    os.replace(project.root, trash)  # atomic: the project vanishes at once
    shutil.rmtree(trash, ignore_errors=True)


class Project:
    """One project folder. Cheap to create: open one per request, never cache connections."""

    def __init__(self, slug: str) -> None:
        self.slug = slug
        self.root = projects_dir() / slug
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.root / "project.db", timeout=30)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            _migrate(con)
        finally:
            con.close()

    def __repr__(self) -> str:
        return f"Project({self.slug!r})"

    # -- database ----------------------------------------------------------------

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction: committed on success, rolled back on error."""
        con = sqlite3.connect(self.root / "project.db", timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        con = sqlite3.connect(self.root / "project.db", timeout=30)
        try:
            return con.execute(sql, tuple(params)).fetchall()
        finally:
            con.close()

    def frame(self, sql: str, params: Iterable = ()) -> pd.DataFrame:
        con = sqlite3.connect(self.root / "project.db", timeout=30)
        try:
            return pd.read_sql_query(sql, con, params=tuple(params))
        finally:
            con.close()

    # -- metadata ----------------------------------------------------------------

    def get_meta(self, key: str, default=None):
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_meta(self, key: str, value) -> None:
        with self.db() as con:
            con.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    @property
    def name(self) -> str:
        return self.get_meta("name", self.slug)

    @property
    def created_at(self) -> float:
        return float(self.get_meta("created_at", 0.0))

    def rename(self, new_name: str) -> None:
        """Change the display name; the slug (and so links) stays the same."""
        new_name = " ".join(new_name.split())
        if not new_name:
            raise InputError("The new name is empty.")
        self.set_meta("name", new_name)

    def path(self, *parts: str) -> Path:
        """A folder or file inside the project (folders are created on demand)."""
        path = self.root.joinpath(*parts)
        (path if not path.suffix else path.parent).mkdir(parents=True, exist_ok=True)
        return path

    # -- photos ------------------------------------------------------------------

    def image_path(self, sha: str, ext: str | None = None) -> Path:
        if ext is None:
            rows = self.query("SELECT ext FROM images WHERE sha = ?", (sha,))
            if not rows:
                raise KeyError(sha)
            ext = rows[0][0]
        return self.root / "images" / sha[:2] / f"{sha}{ext}"

    def add_image(
        self,
        src: Path,
        *,
        name: str,
        upload: str | None = None,
        info: Mapping | None = None,
        sha: str | None = None,
    ) -> tuple[str, bool]:
        """Store a checked photo once by content hash and remember the name it came under.

        Returns ``(sha, stored)``; ``stored`` is False when the same bytes were already in
        the project (re-uploading a photo adds nothing). A name re-uploaded with other
        bytes now points to the new photo.
        """
        sha = sha or sha256_file(src)
        ext = Path(name).suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,5}", ext):
            ext = ".img"
        info = dict(info or {})
        stored = False
        if not self.query("SELECT 1 FROM images WHERE sha = ?", (sha,)):
            atomic_copy(src, self.image_path(sha, ext))
            stored = True
        with self.db() as con:
            con.execute(
                "INSERT OR IGNORE INTO images(sha, ext, bytes, width, height, format, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sha, ext, src.stat().st_size, info.get("width"), info.get("height"),
                 info.get("format"), time.time()),
            )
            con.execute(
                "INSERT INTO names(name, sha, upload, added_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET sha = excluded.sha, upload = excluded.upload, "
                "added_at = excluded.added_at",
                (name, sha, upload, time.time()),
            )
        return sha, stored

    def images(self) -> pd.DataFrame:
        """One row per stored photo: sha, ext, bytes, width, height, format."""
        return self.frame("SELECT sha, ext, bytes, width, height, format FROM images ORDER BY added_at")

    def names(self) -> pd.DataFrame:
        """Every file name the photos were uploaded under: name, sha, upload."""
        return self.frame("SELECT name, sha, upload FROM names ORDER BY name")

    def thumbnail(self, sha: str, *, size: int = 256) -> bytes:
        """A small JPEG preview, made once and kept; a placeholder (not kept) when the stored photo
        is gone or damaged, so a page or the report never stops on it."""
        thumb = self.root / "thumbs" / sha[:2] / f"{sha}-{size}.jpg"
        if thumb.is_file():
            return thumb.read_bytes()
        try:
            data = make_thumbnail(self.image_path(sha), size=size)
        except ImageError:
            return placeholder(size=size)
        atomic_write_bytes(thumb, data)
        return data

    # -- labels ------------------------------------------------------------------

    def set_sheet_labels(self, labels: Mapping[str, str]) -> None:
        """Replace the labels read from the sheet (keyed by uploaded file name).

        Manual fixes made in the app live apart (:meth:`set_override`) and survive a new sheet.
        """
        with self.db() as con:
            con.execute("DELETE FROM sheet_labels")
            con.executemany(
                "INSERT INTO sheet_labels(name, label) VALUES (?, ?)", sorted(labels.items())
            )

    def set_override(
        self, sha: str, *, label: str | None = None, excluded: bool | None = None
    ) -> None:
        """Record a manual fix for one photo: a new label and/or leaving it out of training."""
        with self.db() as con:
            row = con.execute(
                "SELECT label, excluded FROM overrides WHERE sha = ?", (sha,)
            ).fetchone()
            old_label, old_excluded = row if row else (None, 0)
            con.execute(
                "INSERT OR REPLACE INTO overrides(sha, label, excluded, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (
                    sha,
                    label if label is not None else old_label,
                    int(excluded) if excluded is not None else old_excluded,
                    time.time(),
                ),
            )

    def clear_override(self, sha: str) -> None:
        with self.db() as con:
            con.execute("DELETE FROM overrides WHERE sha = ?", (sha,))

    def dataset(self) -> pd.DataFrame:
        """One row per photo with its effective label.

        Columns: sha, name (first upload name), names (how many), sheet_label, label
        (manual fix if any, else the sheet's), label_source ("sheet", "manual", "conflict",
        "" when unlabelled), excluded (bool). Photos whose several names carry different
        sheet labels are left unlabelled ("conflict") until the analyst decides.
        """
        photos = self.frame(
            "SELECT n.sha AS sha, MIN(n.name) AS name, COUNT(*) AS names, "
            "COUNT(DISTINCT s.label) AS n_labels, MIN(s.label) AS sheet_label "
            "FROM names n LEFT JOIN sheet_labels s ON s.name = n.name "
            "GROUP BY n.sha ORDER BY MIN(n.name)"
        )
        overrides = self.frame("SELECT sha, label AS manual_label, excluded FROM overrides")
        df = photos.merge(overrides, on="sha", how="left")
        conflict = df["n_labels"] > 1
        df.loc[conflict, "sheet_label"] = None
        manual = df["manual_label"].notna()
        df["label"] = df["manual_label"].where(manual, df["sheet_label"]).fillna("")
        df["label_source"] = "sheet"
        df.loc[df["label"] == "", "label_source"] = ""
        df.loc[conflict & ~manual, "label_source"] = "conflict"
        df.loc[manual, "label_source"] = "manual"
        df["excluded"] = df["excluded"].fillna(0).astype(bool)
        df["sheet_label"] = df["sheet_label"].fillna("")
        return df[["sha", "name", "names", "sheet_label", "label", "label_source", "excluded"]]

    def training_set(self) -> pd.DataFrame:
        """Labelled, not excluded photos: the rows a model learns from."""
        df = self.dataset()
        return df[(df["label"] != "") & ~df["excluded"]].reset_index(drop=True)

    def set_class_names(self, names: Mapping[str, str]) -> None:
        """Readable names for labels ("1" → "Person in photo"); empty resets to the label."""
        with self.db() as con:
            for label, display in names.items():
                display = " ".join(str(display).split())
                if display and display != label:
                    con.execute(
                        "INSERT OR REPLACE INTO classes(label, display) VALUES (?, ?)",
                        (label, display),
                    )
                else:
                    con.execute("DELETE FROM classes WHERE label = ?", (label,))

    def class_names(self) -> dict[str, str]:
        return dict(self.query("SELECT label, display FROM classes"))

    def display(self, label: str) -> str:
        return self.class_names().get(label, label)

    # -- problems ----------------------------------------------------------------

    def replace_problems(self, scope: str, problems: Iterable[Problem]) -> None:
        """Replace the problems of one scope ("sheet", or an upload id)."""
        now = time.time()
        with self.db() as con:
            con.execute("DELETE FROM problems WHERE scope = ?", (scope,))
            con.executemany(
                "INSERT INTO problems(scope, kind, message, file, row, severity, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(scope, p.kind, p.message, p.file, p.row, p.severity, now) for p in problems],
            )

    def add_problems(self, scope: str, problems: Iterable[Problem]) -> None:
        now = time.time()
        with self.db() as con:
            con.executemany(
                "INSERT INTO problems(scope, kind, message, file, row, severity, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(scope, p.kind, p.message, p.file, p.row, p.severity, now) for p in problems],
            )

    def problems(self) -> pd.DataFrame:
        """All recorded problems: severity, kind, file, row, message, scope."""
        return self.frame(
            "SELECT severity, kind, file, row, message, scope FROM problems "
            "ORDER BY CASE severity WHEN 'error' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, id"
        )

    # -- uploads -----------------------------------------------------------------

    def record_upload(self, upload_id: str, *, filename: str, kind: str, staged_path: Path) -> None:
        with self.db() as con:
            con.execute(
                "INSERT OR REPLACE INTO uploads(id, filename, kind, staged_path, status, at) "
                "VALUES (?, ?, ?, ?, 'staged', ?)",
                (upload_id, filename, kind, str(staged_path), time.time()),
            )

    def finish_upload(self, upload_id: str, summary: Mapping) -> None:
        with self.db() as con:
            con.execute(
                "UPDATE uploads SET status = 'done', summary = ?, staged_path = NULL WHERE id = ?",
                (json.dumps(dict(summary)), upload_id),
            )

    def uploads(self, *, status: str | None = None) -> pd.DataFrame:
        sql = "SELECT id, filename, kind, staged_path, status, summary, at FROM uploads"
        if status:
            return self.frame(sql + " WHERE status = ? ORDER BY at", (status,))
        return self.frame(sql + " ORDER BY at")
