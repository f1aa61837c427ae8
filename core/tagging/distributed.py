"""Tagging a catalog on Ray Data: the same run, spread over many processes or machines.

The single-machine path (:func:`core.tagging.run.run_tagging`) stays the default. For a
catalog too big for one machine, :func:`run_tagging_on_ray` feeds the run's unfinished rows
to Ray Data: ``map_batches`` over an actor that loads the model once
(:class:`~core.tagging.run.RowTagger`, the very code the single-machine path runs per chunk:
the project's photo finder, its safe downloader for links, the :class:`Predictor`). Finished
rows come back to this process and are kept in the run's ``results.db`` as they arrive, so
the output (:func:`core.tagging.output.write_output`) is the same file, row for row, and an
interrupted run resumes like any other.

Ray is optional (``requirements-ray.txt``); it is imported only here, when asked for. With no
``address`` a local Ray instance is started for the run and stopped after it. On a cluster,
the run folder (catalog, model, photos) must be on storage every worker can read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from core.base.problems import InputError
from core.tagging.run import (
    Progress,
    RowTagger,
    TagOptions,
    TagSummary,
    load_run,
    pending_rows,
    photo_cells,
    results_db,
    save_results,
    summarise,
)

__all__ = ["RAY_MISSING", "ray_available", "run_tagging_on_ray"]

RAY_MISSING = "Tagging on Ray needs Ray, which is not installed: pip install -r requirements-ray.txt -c constraints.txt"
_RESULT_COLUMNS = ["row", "predicted_label", "confidence", "needs_review", "tag_error", "photos"]


def ray_available() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


class _TagActor:
    """One Ray worker: the model loaded once, then one batch of rows after another."""

    def __init__(self, folder: str, device: str | None, project_files: dict[str, str] | None):
        files = {name: Path(path) for name, path in (project_files or {}).items()}
        self.tagger = RowTagger(Path(folder), device=device, project_files=files or None)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        before = self.tagger.photos
        cells = {int(row): json.loads(text) for row, text in zip(batch["row"], batch["cells"], strict=True)}
        out = pd.DataFrame(self.tagger.tag(cells), columns=_RESULT_COLUMNS)
        out["batch_photos"] = [self.tagger.photos - before] + [0] * (len(out) - 1)
        return out


def _records(frame: pd.DataFrame) -> list[tuple]:
    """Result records as the single-machine path keeps them (no confidence: None, not NaN)."""
    return [
        (int(r), str(label), None if pd.isna(conf) else float(conf), int(review), str(error), str(photos))
        for r, label, conf, review, error, photos in frame[_RESULT_COLUMNS].itertuples(index=False, name=None)
    ]


def _start_ray(address: str | None, num_cpus: int | None):
    """Connect to ``address`` or start a local instance; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False, runtime_env={"py_modules": [_core_package()]})
        except ConnectionError as exc:
            raise InputError(
                f"Could not reach the Ray cluster at {address}: {exc}. Check the address "
                "(ray://HOST:10001, or 'auto' on a machine of the cluster)."
            ) from exc
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _core_package() -> str:
    return str(Path(__file__).resolve().parents[1])


def run_tagging_on_ray(
    folder: Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    device: str | None = None,
    project_files: dict[str, Path] | None = None,
    on_progress: Progress | None = None,
) -> TagSummary:
    """Tag every unfinished row of the run in ``folder`` on Ray Data (see the module notes).

    ``address``: a running Ray cluster (``ray://host:10001``, or ``auto``); None starts a
    local one with ``num_cpus`` CPUs (None: all). ``workers``: how many model copies run at
    once (default: one per CPU, or one per GPU). ``gpus_per_worker``: GPUs each worker holds
    (default: 1 when the cluster has GPUs and ``device`` allows CUDA, else none). Rows go in
    batches of the run's ``chunk_rows``. Raises InputError when Ray is not installed.
    """
    if not ray_available():
        raise InputError(RAY_MISSING)
    import ray

    cells = photo_cells(folder)
    total = len(cells)
    options = TagOptions(**load_run(folder)["options"])
    report = on_progress or (lambda d, t, m: None)
    summary = TagSummary(rows=total)
    started = time.time()
    photos = 0
    con = results_db(folder)
    started_ray = _start_ray(address, num_cpus)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        todo = pending_rows(con, total)
        report(total - len(todo), total, "Tagging")
        if todo:
            resources = ray.cluster_resources()
            if gpus_per_worker is None and resources.get("GPU", 0) and (device or "auto").startswith(("auto", "cuda")):
                gpus_per_worker = 1.0  # GPUs in the cluster: one per worker, the model on it
            if workers is None:
                pool = resources.get("GPU", 0) / gpus_per_worker if gpus_per_worker else resources.get("CPU", 1)
                workers = max(1, int(pool))
            # One block per chunk, made here: the workers may hold every CPU of the cluster, so
            # nothing upstream of them may need a task of its own (a repartition would wait forever).
            chunks = [todo[s : s + options.chunk_rows] for s in range(0, len(todo), options.chunk_rows)]
            blocks = [pd.DataFrame({"row": rows, "cells": [json.dumps(cells[i]) for i in rows]}) for rows in chunks]
            tagged = ray.data.from_pandas(blocks).map_batches(
                _TagActor,
                fn_constructor_kwargs={
                    "folder": str(Path(folder).resolve()),
                    "device": device,
                    "project_files": {k: str(v) for k, v in (project_files or {}).items()},
                },
                batch_size=None,
                batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=0 if gpus_per_worker else 1,
                **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
            )
            done = total - len(todo)
            for batch in tagged.iter_batches(batch_format="pandas", batch_size=None):
                save_results(con, _records(batch))
                photos += int(batch["batch_photos"].sum())
                done += len(batch)
                report(min(done, total), total, "Tagging")
        return summarise(con, summary, photos=photos, started=started)
    finally:
        con.close()
        if started_ray:
            ray.shutdown()
