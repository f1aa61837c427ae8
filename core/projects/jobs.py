"""Long-running work in the background, with its state in the project database.

A job is a row in the project's ``jobs`` table and a detached process
(``python -m core job-run``) that does the work and writes progress as it goes. The
browser only reads that row, so a page can be refreshed, closed or opened in a second
tab and still show the same progress, and a server restart does not kill the work.
Cancelling sets a flag the job checks between steps. A job whose process died is shown
as "interrupted"; submitting it again resumes from what was saved (the handlers are
written to be resumable).

Handlers register themselves with :func:`register`; ``core.tasks`` holds the app's, so
this module stays at the bottom of the dependency graph (whoever submits or runs a job
imports ``core.tasks`` first). Submitting a job that is already running with the same
parameters asks it to run once more when it finishes, so work that arrived meanwhile
(photos uploaded during a check, say) is never left behind. The check and the new row are
one SQLite write transaction (``BEGIN IMMEDIATE`` locks the database file for every
process), so simultaneous submits of one job, from pages or command lines, make one job;
a job is run by whichever process claims it first (queued -> running, also one transaction).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.projects.workspace import Project, home

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled", "interrupted")
HEARTBEAT_S = 5.0
# A running job that has not written anything for this long, and whose process is gone,
# is shown as interrupted.
STALE_S = 30.0


class JobCancelled(Exception):
    """Raised inside a handler when the user pressed Cancel."""


@dataclass
class JobContext:
    """What a handler gets: its parameters and a way to report progress and check cancel."""

    project: Project
    job_id: str
    params: dict
    _last_write: float = field(default=0.0, repr=False)

    def progress(self, done: int, total: int, message: str | None = None, *, force: bool = False) -> None:
        """Record progress; writes are throttled to a few per second."""
        now = time.time()
        if not force and now - self._last_write < 0.25 and done < total:
            return
        self._last_write = now
        with self.project.db() as con:
            con.execute(
                "UPDATE jobs SET done = ?, total = ?, message = COALESCE(?, message), updated_at = ? "
                "WHERE id = ?",
                (int(done), int(total), message, now, self.job_id),
            )

    def event(self, **payload) -> None:
        """Append a structured event (e.g. one epoch's loss) that the page can chart."""
        with self.project.db() as con:
            con.execute(
                "INSERT INTO job_events(job_id, at, payload) VALUES (?, ?, ?)",
                (self.job_id, time.time(), json.dumps(payload)),
            )

    def cancelled(self) -> bool:
        rows = self.project.query("SELECT cancel FROM jobs WHERE id = ?", (self.job_id,))
        return bool(rows and rows[0][0])

    def check_cancel(self) -> None:
        if self.cancelled():
            raise JobCancelled()


Handler = Callable[[JobContext], Mapping | None]
_HANDLERS: dict[str, Handler] = {}


def register(kind: str) -> Callable[[Handler], Handler]:
    """Decorator: ``@register("intake") def run_intake(ctx): ...``."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[kind] = fn
        return fn

    return wrap


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    params: dict
    status: str
    done: int
    total: int
    message: str | None
    error: str | None
    result: dict | None
    created_at: float
    started_at: float | None
    updated_at: float | None
    finished_at: float | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def elapsed(self) -> float:
        if not self.started_at:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at


_COLUMNS = (
    "id, kind, params, status, done, total, message, error, result, "
    "created_at, started_at, updated_at, finished_at, pid"
)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie is a dead job whose parent has not reaped it yet
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True
    return True


def _row_to_job(project: Project, row: tuple) -> Job:
    (job_id, kind, params, status, done, total, message, error, result,
     created, started, updated, finished, pid) = row
    if status in ACTIVE:
        last = updated or started or created
        if time.time() - last > STALE_S and not _pid_alive(pid):
            status, error = "interrupted", "The work stopped unexpectedly (the computer or the app was restarted)."
            with project.db() as con:
                con.execute(
                    "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status IN ('queued','running')",
                    (status, error, time.time(), job_id),
                )
    return Job(job_id, kind, json.loads(params), status, done, total, message, error,
               json.loads(result) if result else None, created, started, updated, finished)


def get(project: Project, job_id: str) -> Job | None:
    rows = project.query(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
    return _row_to_job(project, rows[0]) if rows else None


def latest(project: Project, kind: str, *, where: Mapping | None = None) -> Job | None:
    """The most recent job of a kind (optionally with matching parameters)."""
    rows = project.query(
        f"SELECT {_COLUMNS} FROM jobs WHERE kind = ? ORDER BY created_at DESC LIMIT 50", (kind,)
    )
    for row in rows:
        job = _row_to_job(project, row)
        if not where or all(job.params.get(k) == v for k, v in where.items()):
            return job
    return None


def events(project: Project, job_id: str) -> list[dict]:
    rows = project.query("SELECT payload FROM job_events WHERE job_id = ? ORDER BY at", (job_id,))
    return [json.loads(r[0]) for r in rows]


def submit(project: Project, kind: str, params: Mapping | None = None, *, start: bool = True) -> Job:
    """Start a job in a detached process. If the same job is already active, return that
    one and have it run once more when it finishes (what it reads may have changed)."""
    if kind not in _HANDLERS:
        raise ValueError(f"Unknown job kind {kind!r}; known: {sorted(_HANDLERS)}")
    params = dict(params or {})
    created = False
    with project.db() as con:  # one write transaction: no other submit sits between look and insert
        for job_id, raw, updated, started, made, pid in con.execute(
            "SELECT id, params, updated_at, started_at, created_at, pid FROM jobs WHERE kind = ? "
            "AND status IN ('queued', 'running') ORDER BY created_at DESC", (kind,)
        ).fetchall():
            alive = time.time() - (updated or started or made) <= STALE_S or _pid_alive(pid)
            if alive and json.loads(raw) == params:
                con.execute("UPDATE jobs SET again = 1 WHERE id = ?", (job_id,))
                break
        else:
            created = True
            job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            con.execute(
                "INSERT INTO jobs(id, kind, params, status, created_at, updated_at) "
                "VALUES (?, ?, ?, 'queued', ?, ?)",
                (job_id, kind, json.dumps(params), time.time(), time.time()),
            )
    if start and created:
        _spawn(project, job_id)
    return get(project, job_id)


def run_here(project: Project, kind: str, params: Mapping | None = None, *,
             on_progress: Callable[[int, int, str | None], None] | None = None) -> Job:
    """Submit a job and run it in this process, or, when the same job is already active
    (another command line, the app), wait for that one instead of doing the work twice.
    ``on_progress`` sees the job's progress as recorded, whoever runs it."""
    job = submit(project, kind, params, start=False)
    stop = threading.Event()

    def watch() -> None:
        seen = None
        while not stop.wait(0.5):
            now = get(project, job.id)
            if now and (now.done, now.total, now.message) != seen and now.total:
                seen = (now.done, now.total, now.message)
                on_progress(*seen)

    watcher = threading.Thread(target=watch, daemon=True)
    if on_progress:
        watcher.start()
    try:
        job = run(project, job.id)
        return wait(project, job.id, timeout=float("inf")) if job.active else job
    finally:
        stop.set()


def _spawn(project: Project, job_id: str) -> None:
    log = project.path("logs", f"{job_id}.log")
    env = dict(os.environ)
    env["CATALOG_LENS_HOME"] = str(home())
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as out:
        subprocess.Popen(
            [sys.executable, "-m", "core", "job-run", "--project", project.slug, "--job", job_id],
            cwd=repo_root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the Streamlit server
        )


def cancel(project: Project, job_id: str) -> None:
    """Ask a job to stop; it stops at its next check and keeps what it finished."""
    with project.db() as con:
        con.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        # A job that never started can be marked at once.
        con.execute(
            "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'queued' "
            "AND pid IS NULL",
            (time.time(), job_id),
        )


def run(project: Project, job_id: str) -> Job:
    """Run a job in this process (what the detached process does; tests call it directly).
    The handler runs again while the job was submitted anew during its run."""
    job = get(project, job_id)
    if job is None:
        raise ValueError(f"No job {job_id} in project {project.slug}")
    handler = _HANDLERS[job.kind]
    with project.db() as con:  # claim it: of two processes told to run one job, one does
        claimed = con.execute(
            "UPDATE jobs SET status = 'running', pid = ?, started_at = ?, updated_at = ? "
            "WHERE id = ? AND status = 'queued'",
            (os.getpid(), time.time(), time.time(), job_id),
        ).rowcount
    if not claimed:
        return get(project, job_id)
    ctx = JobContext(project, job_id, job.params)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with project.db() as con:
                    con.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time(), job_id))
            except Exception:  # the next beat tries again
                pass

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        while True:
            status, result, error = _attempt(handler, ctx)
            # One transaction decides: run again (submitted meanwhile), or finish. A submit
            # that comes after this sees a finished job and starts a new one.
            with project.db() as con:
                again = status == "done" and con.execute(
                    "UPDATE jobs SET again = 0 WHERE id = ? AND again = 1", (job_id,)).rowcount
                if not again:
                    con.execute(
                        "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ? "
                        "WHERE id = ?",
                        (status, json.dumps(dict(result)) if result else None, error, time.time(), time.time(),
                         job_id),
                    )
            if not again:
                break
    finally:
        stop.set()
    return get(project, job_id)


def _attempt(handler: Handler, ctx: JobContext) -> tuple[str, Mapping | None, str | None]:
    try:
        result = handler(ctx)
    except JobCancelled:
        return "cancelled", None, None
    except Exception as exc:  # the job fails, the app does not
        traceback.print_exc()
        return "failed", None, _plain_error(exc)
    return ("cancelled" if ctx.cancelled() else "done"), result, None


def _plain_error(exc: Exception) -> str:
    if isinstance(exc, (ValueError, RuntimeError, OSError)) and str(exc):
        return str(exc)
    return f"Something went wrong ({type(exc).__name__}: {exc}). The details are in the job log."


def wait(project: Project, job_id: str, *, timeout: float = 600.0, poll: float = 0.2) -> Job:
    """Block until a job finishes (for the command line and tests)."""
    deadline = time.time() + timeout
    while True:
        job = get(project, job_id)
        if job is None or not job.active:
            return job
        if time.time() > deadline:
            raise TimeoutError(f"Job {job_id} still running after {timeout:.0f} s")
        time.sleep(poll)
