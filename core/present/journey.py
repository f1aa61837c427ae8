"""Where a project stands in the six-step journey, read from the workspace only."""

from __future__ import annotations

from dataclasses import dataclass

from core.inputs.labels import MIN_PER_CLASS
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
    data_ok = len(classes) >= 2 and min(classes.values()) >= MIN_PER_CLASS
    backbone = project.get_meta("features_ready")  # set by the extraction job
    done = {
        "data": data_ok,
        "backbone": bool(data_ok and backbone and backbone.get("photos", 0) >= len(training)),
        "train": bool(project.get_meta("model_ready")),
        "explore": bool(project.get_meta("explored")),
        "tag": bool(project.get_meta("tagged")),
        "report": bool(project.get_meta("reported")),
    }
    return Progress(photos, len(training), classes, done)
