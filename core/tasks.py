"""The background jobs the app can start, registered with :mod:`core.jobs`.

Each handler is a thin adapter: it reads its parameters, calls the module that does the
work with progress and cancel callbacks, and returns a small JSON-able result.
"""

from __future__ import annotations

from core import intake
from core.jobs import JobContext, register


@register("intake")
def run_intake(ctx: JobContext) -> dict:
    """Check and store the photos staged by the Data page."""
    summary = intake.process_staged(
        ctx.project,
        on_progress=lambda done, total, message: ctx.progress(done, total, message),
        should_cancel=ctx.cancelled,
    )
    return summary.to_dict()
