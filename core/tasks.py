"""The background jobs the app can start, registered with :mod:`core.projects.jobs`.

Each handler is a thin adapter: it reads its parameters, calls the module that does the
work with progress and cancel callbacks, and returns a small JSON-able result. Pages and
the command line start jobs through :func:`submit` (importing this module is what makes
the kinds known) and a job's process runs them through :func:`run`.
"""

from __future__ import annotations

from collections.abc import Mapping

from core import tagging
from core.learning import extraction, training
from core.projects import intake, jobs
from core.projects.jobs import Job, JobContext, register
from core.projects.workspace import Project
from core.vision import backbones, tuning

__all__ = ["run", "run_here", "submit"]


def submit(project: Project, kind: str, params: Mapping | None = None, *, start: bool = True) -> Job:
    """Start one of the app's jobs in the background (see :func:`core.projects.jobs.submit`)."""
    return jobs.submit(project, kind, params, start=start)


def run(project: Project, job_id: str) -> Job:
    """Run a submitted job in this process (what the job's own process does)."""
    return jobs.run(project, job_id)


def run_here(project: Project, kind: str, params: Mapping | None = None, *, on_progress=None) -> Job:
    """Run a job in this process (the command line), or wait for the same one already running
    (see :func:`core.projects.jobs.run_here`): two identical commands do the work once."""
    return jobs.run_here(project, kind, params, on_progress=on_progress)


def _progress(ctx: JobContext):
    return lambda done, total, message: ctx.progress(done, total, message)


@register("intake")
def run_intake(ctx: JobContext) -> dict:
    """Check and store the photos staged by the Data page."""
    return intake.process_staged(ctx.project, on_progress=_progress(ctx), should_cancel=ctx.cancelled).to_dict()


@register("extract")
def run_extract(ctx: JobContext) -> dict:
    """Compute the features of every photo in the project with one backbone (cached)."""
    return extraction.extract_project(ctx.project, ctx.params["backbone"], device=ctx.params.get("device"),
                                      on_progress=_progress(ctx), should_cancel=ctx.cancelled)


@register("speeds")
def run_speeds(ctx: JobContext) -> dict:
    """Measure how fast every backbone runs on this computer (remembered afterwards)."""
    entries = backbones.list_backbones()
    speeds = {}
    for i, backbone in enumerate(entries):
        ctx.check_cancel()
        ctx.progress(i, len(entries), f"Timing {backbone.name}", force=True)
        speeds[backbone.id] = round(tuning.measure_speed(backbone.id, device=ctx.params.get("device")), 1)
    ctx.progress(len(entries), len(entries), "Done", force=True)
    return speeds


@register("train-frozen")
def run_train_frozen(ctx: JobContext) -> dict:
    """Cross-validate and fit the frozen-backbone classifier."""
    record = training.train_frozen(ctx.project, backbone_id=ctx.params.get("backbone"),
                                   seed=int(ctx.params.get("seed", 0)), on_progress=_progress(ctx))
    return {"run": record.id, "headline": record.headline}


@register("train-finetune")
def run_train_finetune(ctx: JobContext) -> dict:
    """Fine-tune the backbone, scored on the same held-out photos as the frozen head."""
    record = training.train_finetuned(
        ctx.project, backbone_id=ctx.params.get("backbone"), seed=int(ctx.params.get("seed", 0)),
        device=ctx.params.get("device"), on_progress=_progress(ctx), on_epoch=lambda epoch: ctx.event(**epoch),
        should_cancel=ctx.cancelled,
    )
    return {"run": record.id, "headline": record.headline} if record else {"cancelled": True}


@register("tag")
def run_tag(ctx: JobContext) -> dict:
    """Tag every row of a catalog (resumes a run that was interrupted)."""
    folder = tagging.project_run_folder(ctx.project, ctx.params["run"])
    summary = tagging.run_tagging(
        folder, project_files=tagging.project_photo_files(ctx.project), device=ctx.params.get("device"),
        feature_store=extraction.feature_store(ctx.project), on_progress=_progress(ctx), should_cancel=ctx.cancelled,
    )
    return summary.to_dict()
