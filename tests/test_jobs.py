"""Background jobs: state in the workspace, cancel, failure, interruption."""

from __future__ import annotations

import time

import pytest

from core.projects import jobs, workspace


@jobs.register("test-count")
def _count(ctx: jobs.JobContext) -> dict:
    total = ctx.params["n"]
    for i in range(total):
        if ctx.params.get("cancel_at") == i:
            jobs.cancel(ctx.project, ctx.job_id)
        ctx.check_cancel()
        ctx.progress(i + 1, total, "Counting", force=True)
        ctx.event(step=i)
    return {"counted": total}


@jobs.register("test-fail")
def _fail(ctx: jobs.JobContext) -> None:
    raise ValueError("The sheet has no label column.")


@pytest.fixture
def project():
    return workspace.create_project("jobs")


def test_run_records_progress_events_and_result(project):
    job = jobs.submit(project, "test-count", {"n": 5}, start=False)
    assert job.status == "queued"
    finished = jobs.run(project, job.id)
    assert finished.status == "done" and finished.result == {"counted": 5}
    assert (finished.done, finished.total, finished.fraction) == (5, 5, 1.0)
    assert [e["step"] for e in jobs.events(project, job.id)] == [0, 1, 2, 3, 4]
    assert jobs.latest(project, "test-count").id == job.id


def test_cancel_stops_between_steps_and_keeps_progress(project):
    job = jobs.submit(project, "test-count", {"n": 10, "cancel_at": 3}, start=False)
    finished = jobs.run(project, job.id)
    assert finished.status == "cancelled" and finished.done == 3


def test_failure_is_a_plain_message_not_a_crash(project):
    job = jobs.submit(project, "test-fail", {}, start=False)
    finished = jobs.run(project, job.id)
    assert finished.status == "failed"
    assert finished.error == "The sheet has no label column."


def test_a_dead_process_shows_as_interrupted(project, monkeypatch):
    job = jobs.submit(project, "test-count", {"n": 3}, start=False)
    with project.db() as con:  # a job that started in a process that no longer exists
        con.execute("UPDATE jobs SET status='running', pid=999999, updated_at=? WHERE id=?",
                    (time.time() - 120, job.id))
    assert jobs.get(project, job.id).status == "interrupted"


def test_same_active_job_is_not_started_twice(project):
    first = jobs.submit(project, "test-count", {"n": 3}, start=False)
    again = jobs.submit(project, "test-count", {"n": 3}, start=False)
    other = jobs.submit(project, "test-count", {"n": 4}, start=False)
    assert again.id == first.id and other.id != first.id


def test_unknown_kind_is_refused(project):
    with pytest.raises(ValueError, match="Unknown job kind"):
        jobs.submit(project, "nope")


@jobs.register("test-once")
def _once(ctx: jobs.JobContext) -> dict:
    """Resumable work like extraction: it does what is not done yet (a marker file)."""
    marker = ctx.params["marker"]
    import pathlib

    done = pathlib.Path(marker)
    if done.exists():
        return {"work": 0}
    time.sleep(1.0)
    with open(marker + ".log", "a") as log:
        log.write("worked\n")
    done.touch()
    return {"work": 1}


def _run_here_in_process(slug, home, marker, out):
    import os

    os.environ["CATALOG_LENS_HOME"] = home
    job = jobs.run_here(workspace.open_project(slug), "test-once", {"marker": marker})
    out.put((job.id, job.status))


def test_simultaneous_submits_of_one_job_make_one_job(project):
    """Four submits at once (before: four jobs); the look-and-insert is one transaction."""
    import threading

    barrier, ids = threading.Barrier(4), []

    def submit():
        barrier.wait()
        ids.append(jobs.submit(project, "test-count", {"n": 2}, start=False).id)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ids) == 4 and len(set(ids)) == 1
    assert len(project.query("SELECT id FROM jobs WHERE kind = 'test-count'")) == 1


def test_two_processes_running_one_job_do_the_work_once(project, tmp_path):
    """Two command lines start the same job: one runs it, the other waits for it (before: both worked)."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("fork")
    out, marker = ctx.Queue(), str(tmp_path / "done")
    procs = [ctx.Process(target=_run_here_in_process, args=(project.slug, os.environ["CATALOG_LENS_HOME"], marker, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    answers = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert len({job_id for job_id, _ in answers}) == 1 and {s for _, s in answers} == {"done"}
    assert (tmp_path / "done.log").read_text() == "worked\n"


def test_a_job_is_run_by_one_process_only(project):
    job = jobs.submit(project, "test-count", {"n": 2}, start=False)
    assert jobs.run(project, job.id).status == "done"
    again = jobs.run(project, job.id)  # a second runner of a claimed job does nothing
    assert again.status == "done" and len(jobs.events(project, job.id)) == 2
