"""The management report: the question, the data, how well it works, the catalog now, the limits.

:func:`build_report` gathers everything from the workspace into a :class:`Report` made of
plain sentences, counts and small JPEG photos. The Report page draws that object with
Streamlit, and :func:`to_html` writes it as one self-contained HTML file (photos and
charts inlined, no script, no external reference) that prints cleanly to PDF, so the
page, the download and ``python -m core report`` always say the same thing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import pandas as pd

from core import tagging
from core.base.problems import InputError
from core.inputs import images
from core.learning import explore, models, runs, training
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import backbones

PHOTO_SIZE = 160  # pixels on the longest side of every photo in the report
EXAMPLES_PER_CLASS = 4
MISTAKES_SHOWN = 6
NOT_TAGGED = tagging.NOT_TAGGED
PER_CLASS_COLUMNS = {"found": "Found (recall)", "right_when_said": "Right when it says so (precision)",
                     "photos": "Held-out photos"}
METHOD_TITLES = {"frozen": "Quick model (frozen backbone)", "finetuned": "Fine-tuned network"}


@dataclass(frozen=True)
class Photo:
    caption: str
    jpeg: bytes


@dataclass
class MethodResult:
    """One trained model's scores on the held-out photos, in plain words."""

    kind: str
    title: str
    used_for_tagging: bool
    n_test: int
    accuracy: dict  # balanced accuracy: value, low, high (0-1)
    sentence: str  # the headline figure in words
    detail: str  # for two classes: how many it finds and how often it is right, per 100 photos
    per_class: pd.DataFrame  # rows: class display names; columns: found, right_when_said, photos
    confusion: list[list[int]]
    classes: list[str]  # display names, in the confusion matrix's order
    trained_on: str  # date


@dataclass
class CatalogResult:
    """The latest tagged catalog: how many rows got each tag, by category, with examples."""

    name: str
    rows: int
    done: int
    counts: dict[str, int]  # display tag -> rows (the analyst's answers included)
    needs_review: int
    answered: int
    failed: int
    model: str
    category_column: str | None
    category_columns: list[str]  # every column it can be split by, likeliest first
    by_category: pd.DataFrame | None  # rows: categories, columns: tags, cells: rows
    examples: dict[str, list[Photo]]
    out_of_date: str | None = None  # how its tags differ from the chosen model's now (tagging.out_of_date)

    @property
    def finished(self) -> bool:
        return self.done >= self.rows

    @property
    def summary(self) -> str:
        """One sentence on the run: rows, progress, review, model."""
        status = "" if self.finished else f" (tagging in progress: {self.done:,} of {self.rows:,} rows)"
        return (f"{self.name}: {self.rows:,} rows{status}. {self.needs_review:,} flagged for a second look, "
                f"{self.answered:,} answered by hand. Tagged with the {self.model[:1].lower()}{self.model[1:]}.")


@dataclass
class Report:
    project: str
    created: str
    question: str
    in_short: list[str]
    classes: dict[str, int]  # display name -> labelled photos
    held_out: int
    backbone: str
    examples: dict[str, list[Photo]]
    methods: list[MethodResult]
    verdict: str | None
    mistakes: list[Photo]
    catalog: CatalogResult | None
    limits: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- gathering


def default_question(classes: list[str], names: dict[str, str], positive: str | None) -> str:
    if positive is not None:
        return f"Does the photo show “{names.get(positive, positive)}”?"
    shown = [f"“{names.get(c, c)}”" for c in classes]
    return f"Which of these does the photo show: {', '.join(shown[:-1])} or {shown[-1]}?"


def percent(v: float) -> str:
    """A share as a percentage; one decimal near the ends, so 99.6 % never reads as 100 %."""
    if 0.99 < v < 1:
        return f"{math.floor(1000 * v) / 10:.1f} %"
    return f"{math.ceil(1000 * v) / 10:.1f} %" if 0 < v < 0.01 else f"{100 * v:.0f} %"


def _thumb(project: Project, sha: str) -> bytes:
    return project.thumbnail(sha, size=PHOTO_SIZE)  # a placeholder when the photo is gone or damaged


def _method(run: runs.RunRecord, names: dict[str, str], used: bool) -> MethodResult:
    rep = run.test_report
    table = pd.DataFrame(rep["report"]["data"], index=rep["report"]["index"], columns=rep["report"]["columns"])
    table = table.loc[[c for c in run.classes if c in table.index]]
    per_class = pd.DataFrame({
        "found": table["recall"], "right_when_said": table["precision"], "photos": table["support"].astype(int),
    })
    per_class.index = [names.get(c, c) for c in per_class.index]
    acc = rep["balanced_accuracy"]
    n = int(rep["n"])
    pos = names.get(run.positive, run.positive) if run.positive is not None else None
    fairly = f"photos with and without “{pos}” counting equally" if pos else "every class counting equally"
    sentence = (f"On {n} labelled photos it never saw while learning, it gave the right answer "
                f"{percent(acc['value'])} of the time ({fairly}).")
    detail = ""
    if run.positive is not None:
        found = table.loc[run.positive, "recall"]
        right = table.loc[run.positive, "precision"]
        detail = (f"Of every 100 photos that show “{pos}”, it finds about {100 * found:.0f}; when it says "
                  f"“{pos}”, it is right about {100 * right:.0f} times in 100.")
    return MethodResult(
        kind=run.kind, title=METHOD_TITLES.get(run.kind, run.kind), used_for_tagging=used, n_test=n,
        accuracy=acc, sentence=sentence, detail=detail, per_class=per_class, confusion=rep["confusion"],
        classes=[names.get(c, c) for c in run.classes],
        trained_on=time.strftime("%Y-%m-%d", time.localtime(run.created_at)),
    )


def _catalog(project: Project, names: dict[str, str], category: str | None,
             model_titles: dict[str, str], order: list[str], chosen: dict | None) -> CatalogResult | None:
    run_id = ProjectState(project).tagging_run
    if not run_id:
        return None
    folder = tagging.project_run_folder(project, run_id)
    try:
        run = tagging.load_run(folder)
        results = tagging.results_frame(folder)
    except (OSError, ValueError, KeyError):
        return None
    if results.empty:
        return None
    fixed = tagging.overrides(folder)
    final = tagging.final_labels(results, fixed)
    counts = tagging.tag_counts(final, names=names, order=order)
    original = tagging.catalog_rows(folder)
    columns, column = tagging.split_columns(original, image_columns=run.get("options", {}).get("image_columns", []),
                                            saved=category)
    by_category = None
    if column:
        by_category = tagging.share_by(original[column].astype(str), final, names=names, order=order)
    # The surest rows of each tag, their photos found in one pass.
    done = results.assign(final=final)
    done = done[done["final"] != ""].sort_values("confidence", ascending=False, kind="stable")
    top = done.groupby("final", sort=False).head(3 * EXAMPLES_PER_CLASS)
    paths = tagging.review_photos(folder, [{"row": int(r), "photos": json.loads(p or "[]")}
                                           for r, p in zip(top.index, top["photos"])], project)
    tags = set(top["final"])
    examples: dict[str, list[Photo]] = {names.get(t, t): [] for t in [*order, *sorted(tags - set(order))] if t in tags}
    for row, label, conf in zip(top.index, top["final"], top["confidence"]):
        photos = examples[names.get(label, label)]
        if paths.get(int(row)) is None or len(photos) >= EXAMPLES_PER_CLASS:
            continue
        jpeg = images.preview(paths[int(row)], size=PHOTO_SIZE)  # a placeholder if it no longer decodes
        sheet_row = run.get("first_data_row", 2) + int(row)
        photos.append(Photo(f"row {sheet_row} · {percent(conf)} sure" if conf == conf else f"row {sheet_row}", jpeg))
    model_name = model_titles.get(run.get("model_id"), run.get("model_id", ""))
    return CatalogResult(
        name=run.get("catalog_name", "catalog"), rows=int(run["rows"]), done=len(results), counts=counts,
        needs_review=int(results["needs_review"].sum()), answered=len(fixed),
        failed=int((final == "").sum()), model=str(model_name),  # a row answered by hand is tagged now
        category_column=column, category_columns=columns, by_category=by_category, examples=examples,
        out_of_date=tagging.out_of_date(run, chosen),
    )


def _main_run(latest: dict[str, runs.RunRecord], chosen_id: str | None) -> runs.RunRecord:
    """The run the report is about: the model chosen for tagging, else the quick model."""
    return next((r for r in latest.values() if r.id == chosen_id), None) or latest.get("frozen") or next(iter(latest.values()))


def build_report(project: Project, *, question: str | None = None, category: str | None = None) -> Report:
    """Everything the report says, read from the workspace.

    ``question`` and ``category`` (a catalog column to split the tags by; "" for none)
    default to what the analyst saved (:attr:`ProjectState.report_choices`), else to a guess.
    """

    latest = runs.latest_runs(project)
    if not latest:
        raise InputError("The report needs a trained model: train one on the Train & compare step first.")
    names = project.class_names()
    saved = ProjectState(project).report_choices
    chosen = models.tagging_model(project)
    chosen_id = chosen["id"] if chosen else None
    main = _main_run(latest, chosen_id)
    question = question or saved.question or default_question(main.classes, names, main.positive)
    category = category if category is not None else saved.category

    order = sorted(main.classes, key=lambda c: c != main.positive)  # the tag itself first, as everywhere
    data = project.training_set()
    now = data["label"].value_counts()
    then = runs.trained_counts(main)  # what the model really learned from, not what is labelled today
    counts = then if then is not None else {c: int(now.get(c, 0)) for c in order}
    classes = {names.get(c, c): int(counts.get(c, 0)) for c in order}
    examples = {}
    for label in order:
        chosen_rows = data[data["label"] == label].sort_values("sha").head(EXAMPLES_PER_CLASS)
        examples[names.get(label, label)] = [Photo(r.name, j) for r in chosen_rows.itertuples() if (j := _thumb(project, r.sha))]

    methods = [_method(latest[k], names, latest[k].id == chosen_id) for k in ("frozen", "finetuned") if k in latest]
    comparison = training.compare(project, names=("Quick model", "Fine-tuned network"))
    verdict = comparison.verdict if comparison is not None else None

    preds = runs.test_predictions(project, main)
    wrong = preds[preds["label"] != preds["predicted"]].sort_values("confidence", ascending=False)
    mistakes = []
    for r in wrong.head(MISTAKES_SHOWN).itertuples():
        jpeg = _thumb(project, r.sha)
        if jpeg:
            mistakes.append(Photo(f"labelled “{names.get(r.label, r.label)}”, the model said "
                                  f"“{names.get(r.predicted, r.predicted)}” ({percent(r.confidence)} sure)", jpeg))

    titles = {m["id"]: METHOD_TITLES.get(m["kind"], m["name"]) + (" (imported)" if m["source"] != "trained" else "")
              for m in models.list_models(project)}
    catalog = _catalog(project, names, category, titles, order, chosen)
    backbone = backbones.get_backbone(main.backbone_id).name
    used = next(m for m in methods if m.kind == main.kind)
    in_short = [
        f"The model learned from {sum(classes.values()):,} product photos labelled by hand, building on "
        f"{backbone}, a network pretrained on millions of everyday photos.",
        used.sentence,
    ]
    if comparison is not None:
        in_short.append(_plain_verdict(comparison))
    if catalog is not None:
        top = ", ".join(f"{n:,} “{tag}”" for tag, n in catalog.counts.items())
        in_short.append(f"It tagged {catalog.done:,} of the {catalog.rows:,} rows of {catalog.name}: {top}.")
    else:
        in_short.append("No catalog has been tagged yet.")
    report = Report(
        project=project.name, created=time.strftime("%Y-%m-%d %H:%M"), question=question, in_short=in_short,
        classes=classes, held_out=main.test_report["n"] if main.test_report else 0, backbone=backbone,
        examples=examples, methods=methods, verdict=verdict, mistakes=mistakes, catalog=catalog,
    )
    report.limits = _limits(project, report, main, latest, chosen)
    changed = runs.labels_changed(project, main)
    if changed:
        report.limits.insert(0, changed)
    return report


def _plain_verdict(comparison) -> str:
    """The quick-vs-fine-tuned verdict for a manager: what was tried and what is used."""
    tried = "A fine-tuned network, slower to train, was also tried on the same photos"
    if comparison.better == "Fine-tuned network":
        return (f"{tried}: it got {comparison.difference.value:.1f} points more photos right, "
                "so it is the one to use.")
    if comparison.better == "Quick model":
        return f"{tried}: it did worse, so the quick model is the one to use."
    return (f"{tried}: it was not measurably better, so the {comparison.recommended.lower()}, "
            "quicker to train, is the one to use.")


def _limits(project: Project, report: Report, main: runs.RunRecord, latest: dict, chosen: dict | None) -> list[str]:
    n = report.held_out
    limits = [f"The scores come from {n} labelled photos set aside before training. Another set of photos would "
              "give somewhat different numbers; the ranges show by how much."]
    limits += [w for w in main.test_report.get("warnings", [])]
    ds = project.dataset()
    changed = int((ds["label_source"] == "manual").sum())
    left_out = int(ds["excluded"].sum())
    try:
        doubts = explore.label_issues(project)
        doubtful = int(doubts["likely_issue"].sum()) if not doubts.empty else 0
    except (OSError, ValueError, KeyError):
        doubtful = 0
    found = (f"The app found {_count(doubtful, 'photo')} whose label looks doubtful" if doubtful
             else "The app found no photo whose label looks doubtful")
    limits.append(f"The photos were labelled by hand; wrong labels teach the model wrong answers. {found}; "
                  f"{_count(changed, 'label')} corrected and {_count(left_out, 'photo')} left out by hand.")
    limits.append("The model was checked only on photos like the ones it learned from. Photos from another studio, "
                  "camera, background or product range were not tested: look at a sample of those before relying on "
                  "the tags.")
    if "finetuned" not in latest:
        limits.append("Only the quick model was trained; the fine-tuned network, slower to train, was not tried.")
    own, used = main.threshold, (models.threshold(project, main.id) if main.positive else None)
    if own is not None and used is not None and abs(used - own) > 1e-6:
        effect = training.threshold_effect(project, main, used)
        pos = project.class_names().get(main.positive, main.positive)
        limits.append(f"The confidence needed to tag a photo “{pos}” was set by hand to {percent(used)} (the model's "
                      f"own setting was {percent(own)}). The scores above use the model's own; at {percent(used)}, of the {effect['n']} held-out photos, {effect['missed']} of "
                      f"{effect['n_positive']} with “{pos}” would be missed and {effect['flagged']} of "
                      f"{effect['n_negative']} without it wrongly tagged.")
    cat = report.catalog
    if cat is not None and cat.out_of_date:
        limits.append(f"The catalog figures above were tagged {cat.out_of_date} than the one chosen now: tag the "
                      "catalog again on the Tag catalog step to see what the chosen model and setting give.")
    if chosen is not None and chosen.get("source") == "imported":
        limits.append(f"The catalog is tagged with an imported model ({chosen['name']}); the scores above are those of "
                      "this project's own models.")
    if cat is not None:
        if not cat.finished:
            limits.append(f"Tagging is not finished: {cat.done:,} of {cat.rows:,} rows so far.")
        if cat.failed:
            limits.append(f"{cat.failed:,} row{'' if cat.failed == 1 else 's'} could not be tagged (missing or "
                          "unreadable photo); the downloaded sheet says why for each.")
        if cat.needs_review:
            checked = f"{cat.answered:,} of them checked by hand" if cat.answered else "none checked by hand yet"
            limits.append(f"{_count(cat.needs_review, 'row')} flagged as doubtful; {checked}. The other tags were not "
                          "checked one by one.")
        else:
            limits.append("No row was flagged as doubtful, and the tags were not checked one by one.")
    return limits


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def coverage(project: Project) -> str:
    """What a report made now would cover: the models, the one tagging and the catalog rows
    tagged so far. The Report step is done while the last downloaded report covers this."""
    state = ProjectState(project)
    chosen = models.tagging_model(project)
    parts = [*sorted(state.latest_run_ids.values()), chosen["id"] if chosen else "", str(chosen["threshold"] if chosen else "")]
    run_id = state.tagging_run
    if run_id:
        try:
            parts.append(f"{run_id}:{len(tagging.results_frame(tagging.project_run_folder(project, run_id)))}")
        except (OSError, ValueError):
            pass
    return "|".join(parts)


def mark_downloaded(project: Project) -> None:
    """The analyst took the report away: the Report step is done for what it covers."""
    ProjectState(project).mark_reported(coverage(project))
