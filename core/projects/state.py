"""A project's settings and choices, typed, in one place.

Besides photos and labels (:mod:`core.projects.workspace`), a project remembers what the
analyst chose: the network, which trained run is the latest of each kind, the models
imported from elsewhere, the model that tags the catalog and the confidence each model
needs to tag a photo, the current tagging run, the report's wording. Every one of those
is read and written through :class:`ProjectState`, so each key has one owner and one type;
nothing else (pages, jobs, the command line) touches the raw settings store. Whether a
step of the journey is done is not stored here: :mod:`core.present.journey` derives it
from what is on disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.projects.workspace import Project

__all__ = ["ProjectState", "ReportChoices"]

# The keys of the project's settings store (the ``meta`` table); nothing else uses them.
_BACKBONE = "backbone"
_RUNS = "models"  # kind ("frozen" / "finetuned") -> id of the latest run of that kind
_IMPORTED = "imported_models"
_TAGGING_MODEL = "tagging_model"
_THRESHOLDS = "thresholds"  # model id -> confidence needed to tag the positive class
_TAGGING_RUN = "tagging_run"
_REPORT = "report"
_EXPLORED = "explored"  # the run whose map the analyst has looked at
_REPORTED = "reported"  # what the last downloaded report covered
_LAST_EXTRACTION = "features_ready"  # the last extraction's figures, for the Backbone page


@dataclass(frozen=True)
class ReportChoices:
    """The analyst's wording of the report's question and the catalog column to split by
    (None: not chosen; "" for the column: no split)."""

    question: str | None = None
    category: str | None = None


class ProjectState:
    """Typed access to one project's settings. Cheap: make one wherever it is needed."""

    def __init__(self, project: Project):
        self.project = project

    def _get(self, key: str, default: Any = None) -> Any:
        value = self.project.get_meta(key, default)
        return default if value is None else value

    def _update(self, key: str, change) -> Any:
        """Read-modify-write one setting in one transaction: two sessions never lose a write."""
        with self.project.db() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            value = change(json.loads(row[0]) if row else None)
            con.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )
        return value

    # -- the network ----------------------------------------------------------

    @property
    def backbone(self) -> str | None:
        """The network the project uses (None until one is chosen or extracted)."""
        return self._get(_BACKBONE)

    def set_backbone(self, backbone_id: str) -> None:
        self.project.set_meta(_BACKBONE, backbone_id)

    @property
    def last_extraction(self) -> dict:
        """Figures of the last extraction (backbone, computed, seconds, photos_per_s, device...)."""
        return dict(self._get(_LAST_EXTRACTION, {}))

    def record_extraction(self, summary: Mapping) -> None:
        self.project.set_meta(_LAST_EXTRACTION, dict(summary))

    # -- trained and imported models -------------------------------------------

    @property
    def latest_run_ids(self) -> dict[str, str]:
        """Kind ("frozen", "finetuned") -> id of the latest trained run of that kind."""
        return dict(self._get(_RUNS, {}))

    def record_run(self, kind: str, run_id: str) -> None:
        self._update(_RUNS, lambda runs: {**(runs or {}), kind: run_id})

    @property
    def imported_models(self) -> list[dict]:
        """Records of the models imported into the project, oldest first."""
        return list(self._get(_IMPORTED, []))

    def record_imported(self, record: Mapping) -> None:
        """Add (or replace, by ``id``) an imported model's record."""
        entry = dict(record)
        self._update(_IMPORTED, lambda models: [m for m in (models or []) if m.get("id") != entry["id"]] + [entry])

    @property
    def tagging_model_id(self) -> str | None:
        """The model the analyst chose to tag the catalog with (None: not chosen)."""
        return self._get(_TAGGING_MODEL)

    def choose_tagging_model(self, model_id: str | None) -> None:
        self.project.set_meta(_TAGGING_MODEL, model_id)

    def threshold(self, model_id: str) -> float | None:
        """The confidence the analyst chose for a model to tag a photo (None: the model's own)."""
        value = self._thresholds().get(model_id)
        return float(value) if value is not None else None

    def set_threshold(self, model_id: str, value: float | None) -> None:
        """Choose the confidence a model needs to tag a photo (None: back to the model's own)."""
        if value is not None and not 0.0 < float(value) < 1.0:
            raise ValueError(f"A confidence threshold is between 0 and 1 (exclusive), not {value!r}.")

        def change(stored):
            chosen = self._by_model_id(stored or {})
            if value is None:
                chosen.pop(model_id, None)
            else:
                chosen[model_id] = float(value)
            return chosen

        self._update(_THRESHOLDS, change)

    def _thresholds(self) -> dict[str, float]:
        return self._by_model_id(self._get(_THRESHOLDS, {}))

    def _by_model_id(self, stored: Mapping) -> dict[str, float]:
        """Thresholds keyed by model id. Projects made before they were kept by model id
        stored them by kind ("frozen"); those apply to that kind's latest run."""
        runs = self.latest_run_ids
        out: dict[str, float] = {}
        for key, value in stored.items():
            if key in ("frozen", "finetuned"):
                if key in runs:
                    out.setdefault(runs[key], float(value))
            else:
                out[key] = float(value)
        return out

    # -- tagging, exploring, reporting -------------------------------------------

    @property
    def tagging_run(self) -> str | None:
        """The id of the project's current tagging run (the one the Tag page shows)."""
        return self._get(_TAGGING_RUN)

    def set_tagging_run(self, run_id: str) -> None:
        self.project.set_meta(_TAGGING_RUN, run_id)

    @property
    def report_choices(self) -> ReportChoices:
        saved = self._get(_REPORT, {})
        return ReportChoices(saved.get("question"), saved.get("category"))

    def save_report_choices(self, *, question: str | None = None, category: str | None = None) -> None:
        """Remember the analyst's wording of the question and/or the catalog column to split by."""

        def change(saved):
            saved = dict(saved or {})
            if question is not None:
                saved["question"] = question.strip()
            if category is not None:
                saved["category"] = category
            return saved

        self._update(_REPORT, change)

    @property
    def explored_run(self) -> str | None:
        """The run whose map the analyst last looked at (the Explore step)."""
        value = self._get(_EXPLORED)
        return value if isinstance(value, str) else None  # older projects stored True

    def mark_explored(self, run_id: str) -> None:
        if self.explored_run != run_id:
            self.project.set_meta(_EXPLORED, run_id)

    @property
    def reported(self) -> str | None:
        """What the last downloaded report covered (a signature made by the report)."""
        value = self._get(_REPORTED)
        return value if isinstance(value, str) else None

    def mark_reported(self, signature: str) -> None:
        self.project.set_meta(_REPORTED, signature)
