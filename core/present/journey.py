"""Where a project stands in the six-step journey, derived from what is on disk.

A step is done when its result exists and still matches the project as it is now, not
because a flag was once set: the Backbone step is done while every photo has features for
the chosen network, Train while a model of that network was trained on today's labels,
Explore while the analyst has seen the map of the current quick model, Tag while the
catalog is fully tagged by the model chosen for tagging, Report while the last downloaded
report covers all of that. Change a label or the network and the later steps open again.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import tagging
from core.inputs.labels import MIN_PER_CLASS
from core.learning import extraction, models, runs
from core.present import report
from core.projects.state import ProjectState
from core.projects.workspace import Project

STEPS = ("data", "backbone", "train", "explore", "tag", "report")


@dataclass(frozen=True)
class Progress:
    photos: int
    labelled: int
    classes: dict[str, int]
    done: dict[str, bool]

    @property
    def next_step(self) -> str | None:
        return next((step for step in STEPS if not self.done[step]), None)


def progress(project: Project | None) -> Progress:
    """Which steps are finished; cheap enough to call on every page run."""
    if project is None:
        return Progress(0, 0, {}, {step: False for step in STEPS})
    photos = project.query("SELECT COUNT(*) FROM images")[0][0]
    training = project.training_set()
    classes = training["label"].value_counts().to_dict()
    state = ProjectState(project)
    done = dict.fromkeys(STEPS, False)
    done["data"] = len(classes) >= 2 and min(classes.values()) >= MIN_PER_CLASS
    backbone = state.backbone
    done["backbone"] = bool(done["data"] and backbone and extraction.status(project, backbone).complete)
    latest = runs.latest_runs(project)
    current = [r for r in latest.values() if r.backbone_id == backbone and runs.labels_changed(project, r) is None]
    done["train"] = done["backbone"] and bool(current)
    frozen = latest.get("frozen")
    done["explore"] = done["train"] and frozen is not None and state.explored_run == frozen.id
    done["tag"] = done["train"] and _catalog_tagged(project, state)
    done["report"] = done["train"] and state.reported == report.coverage(project)
    return Progress(photos, len(training), classes, done)


def _catalog_tagged(project: Project, state: ProjectState) -> bool:
    """The current tagging run has every row and was made with the model now chosen for tagging,
    at the confidence setting chosen for it now."""
    run_id = state.tagging_run
    chosen = models.tagging_model(project)
    if not run_id or chosen is None:
        return False
    folder = tagging.project_run_folder(project, run_id)
    try:
        run = tagging.load_run(folder)
        finished = len(tagging.results_frame(folder)) >= int(run["rows"])
    except (OSError, ValueError, KeyError):
        return False
    return finished and tagging.out_of_date(run, chosen) is None
