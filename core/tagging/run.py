"""Bulk tagging of a catalog export: streaming, checkpointed, resumable, no row ever lost.

A tagging run lives in one folder::

    <run>/run.json         what was asked: catalog file and its hash, model, its threshold, columns, rule, review band
    <run>/catalog.<ext>    the catalog as uploaded (never modified)
    <run>/catalog.json     the catalog as read once, when the run was created (cells as written and clean)
    <run>/results.db       one row per finished catalog row (SQLite, committed per chunk)

The catalog is read once, by :func:`core.inputs.sheets.read_sheet` (the reader the Tag page
previews with), when the run is created; tagging, resuming, the output and the review queue
all use what was kept. Rows are numbered from 0 under the header, blank rows included.
Rows are tagged in chunks; each chunk's results are committed in one transaction keyed
by the row number, so a crash (even ``kill -9``) loses at most the chunk in flight, and
a resumed run skips finished rows and can never write one twice.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from core.base.files import atomic_write_bytes, atomic_write_text, sha256_file
from core.base.problems import InputError
from core.inputs.catalog import catalog_of, split_cell
from core.inputs.sheets import Sheet, read_sheet
from core.learning import bundles, novelty
from core.learning.predictor import Predictor
from core.tagging.photos import PhotoFinder
from core.tagging.tags import combine_scored
from core.vision.store import FeatureStore

__all__ = ["Progress", "RowTagger", "TagOptions", "TagSummary", "catalog_rows", "catalog_sheet", "create_run",
           "load_run", "pending_rows", "photo_cells", "positive_class", "results_db", "results_frame",
           "resume_conflict", "run_tagging", "save_results", "summarise"]

Progress = Callable[[int, int, str], None]


@dataclass
class TagOptions:
    """What the analyst chose: which columns hold the photos, how several photos combine,
    and which confidences count as "needs review". Photo columns left empty, and the product
    id column left None, are guessed from the catalog when the run is created."""

    image_columns: list[str]
    id_column: str | None = None
    rule: str = "any"  # any | all | first | majority, for rows or products with several photos
    review_below: float = 0.75  # a tag less sure than this is flagged for review
    chunk_rows: int = 256


@dataclass
class TagSummary:
    rows: int = 0
    done: int = 0
    tagged: int = 0
    failed: int = 0
    needs_review: int = 0
    seconds: float = 0.0
    photos_per_s: float = 0.0
    cancelled: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the run


def _model_hash(bundle_path: Path) -> str | None:
    return sha256_file(bundle_path) if Path(bundle_path).is_file() else None  # a bundle folder: its id says it


def create_run(
    folder: Path, *, catalog_path: Path, bundle_path: Path, options: TagOptions,
    images_zip: Path | None = None, images_dir: Path | None = None, threshold: float | None = None,
) -> Path:
    """Prepare a run folder: copy the catalog, read it (the only time it is read) and check the
    chosen photo columns; returns the folder. ``threshold`` is the confidence the model needs
    to give its tag (two-class models; None: the model's own); the run keeps it, so a resumed
    run decides as it started. Raises InputError in words for the analyst."""
    bundle, _ = bundles.load_bundle(bundle_path)
    if threshold is not None and (bundle.positive is None or not 0.0 < threshold < 1.0):
        raise InputError(f"A threshold of {threshold} does not apply to this model: give a number between 0 and 1 "
                         "for a model with two classes.")
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(catalog_path).read_bytes()
    catalog_copy = folder / f"catalog{catalog_path.suffix.lower() or '.csv'}"
    atomic_write_bytes(catalog_copy, data)
    sheet = read_sheet(data, filename=catalog_path.name, keep_raw=True, purpose="catalog")
    found = catalog_of(sheet, image_columns=options.image_columns)
    options = replace(options, image_columns=found.image_columns,
                      id_column=options.id_column or (found.id_column if found.long_format else None))
    _save_sheet(folder / "catalog.json", sheet)
    atomic_write_text(folder / "run.json", json.dumps({
        "catalog": catalog_copy.name,
        "catalog_name": catalog_path.name,
        "catalog_sha256": sha256_file(catalog_copy),
        "bundle": str(Path(bundle_path).resolve()),
        "bundle_sha256": _model_hash(bundle_path),
        "model_id": bundle.id,
        "positive": bundle.positive,
        "threshold": threshold if threshold is not None else bundle.threshold,
        "options": asdict(options),
        "images_zip": str(images_zip) if images_zip else None,
        "images_dir": str(images_dir) if images_dir else None,
        "rows": len(sheet.raw_rows),
        "first_data_row": sheet.first_data_row,
        "created_at": time.time(),
    }, indent=2))
    results_db(folder).close()
    return folder


def load_run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def resume_conflict(folder: Path, *, catalog_path: Path, bundle_path: Path) -> str | None:
    """Why the run in ``folder`` cannot go on with this catalog and model ("the catalog" or
    "the model" differs, by content), or None when they are the ones it was made from."""
    run = load_run(folder)
    made_from = run.get("catalog_sha256") or sha256_file(folder / run["catalog"])
    if sha256_file(catalog_path) != made_from:
        return "the catalog"
    bundle, _ = bundles.load_bundle(bundle_path)
    if bundle.id != run["model_id"] or run.get("bundle_sha256") not in (None, _model_hash(bundle_path)):
        return "the model"
    return None


# ----------------------------------------------------------------- the catalog, read once


def _save_sheet(path: Path, sheet: Sheet) -> None:
    split = sheet.frame.to_dict(orient="split")
    atomic_write_text(path, json.dumps({
        "filename": sheet.filename, "encoding": sheet.encoding, "delimiter": sheet.delimiter,
        "has_header": sheet.has_header, "first_data_row": sheet.first_data_row,
        "columns": split["columns"], "index": split["index"], "data": split["data"],
        "raw_header": sheet.raw_header, "raw_rows": sheet.raw_rows,
    }, ensure_ascii=False))


@functools.lru_cache(maxsize=4)
def _load_sheet(path: Path, stamp: tuple[int, int]) -> Sheet:
    kept = json.loads(path.read_text(encoding="utf-8"))
    frame = pd.DataFrame(kept["data"], index=pd.Index(kept["index"], dtype="int64"), columns=kept["columns"],
                         dtype=object)
    return Sheet(frame=frame, filename=kept["filename"], encoding=kept["encoding"], delimiter=kept["delimiter"],
                 has_header=kept["has_header"], first_data_row=kept["first_data_row"],
                 raw_header=kept["raw_header"], raw_rows=kept["raw_rows"])


def catalog_sheet(folder: Path) -> Sheet:
    """The run's catalog as read when the run was created, with its cells as written.

    Shared between callers in this process: read it, never modify it. A run made before
    the catalog was kept this way reads its copy of the catalog once, here.
    """
    path = folder / "catalog.json"
    if not path.is_file():
        run = load_run(folder)
        _save_sheet(path, read_sheet(folder / run["catalog"], filename=run["catalog_name"], keep_raw=True,
                                     purpose="catalog"))
    stat = path.stat()
    return _load_sheet(path, (stat.st_mtime_ns, stat.st_size))


def catalog_rows(folder: Path) -> pd.DataFrame:
    """Every row of the run's catalog by row number (blank rows as ""), clean cells under the
    sheet's column names: what a row's photos, product id or category are read from."""
    sheet = catalog_sheet(folder)
    return sheet.frame.reindex(range(len(sheet.raw_rows)), fill_value="")


# ------------------------------------------------------------------------ tagging


def results_db(folder: Path) -> sqlite3.Connection:
    """The run's results (one row per finished catalog row); the caller closes it."""
    con = sqlite3.connect(folder / "results.db", timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(
        "CREATE TABLE IF NOT EXISTS results (row INTEGER PRIMARY KEY, predicted_label TEXT, "
        "confidence REAL, needs_review INTEGER, tag_error TEXT, photos TEXT)"
    )
    return con


def results_frame(folder: Path) -> pd.DataFrame:
    """The finished rows' results, by catalog row number."""
    con = results_db(folder)
    try:
        return pd.read_sql_query("SELECT * FROM results ORDER BY row", con).set_index("row")
    finally:
        con.close()


def positive_class(run: dict) -> str | None:
    """The tag the combine rules are about ("any photo shows a person")."""
    return run["positive"] if "positive" in run else bundles.load_bundle(run["bundle"])[0].positive


def _predict(predictor: Predictor, items: Sequence[tuple[str, Path]]) -> dict[str, tuple]:
    """The model's (label, confidence, error, unlike the training photos) for each photo: the one
    place tagging runs the model."""
    if not items:
        return {}
    predictions = predictor.predict(items)
    return {r.image: (r.predicted_label, r.confidence, r.error, bool(r.unlike_training))
            for r in predictions.itertuples()}


def _row_result(i: int, refs: list[str], resolved: dict, answer: dict, options: TagOptions,
                positive: str | None) -> tuple:
    tags, reasons, unlike = [], [], []
    for ref in refs:
        path, why = resolved[ref]
        if path is None:
            reasons.append(why)
        elif answer[ref][2]:
            reasons.append(f"{ref}: {answer[ref][2]}")
        else:
            tags.append((answer[ref][0], float(answer[ref][1])))
            unlike += [ref] if answer[ref][3] else []
    if not refs:
        reasons.append("the row has no photo")
    if not tags:
        return (i, "", None, 1, "; ".join(reasons) or "no usable photo", json.dumps(refs))
    label, conf = combine_scored(tags, rule=options.rule, positive=positive)
    if unlike:  # the model had to pick one of its classes for a photo like none of them
        reasons.append(novelty.REASON if len(refs) == 1 else f"{', '.join(unlike)}: {novelty.REASON}")
    review = conf < options.review_below or bool(unlike)
    return (i, label, round(conf, 4), int(review), "; ".join(reasons), json.dumps(refs))


class RowTagger:
    """A run's model (loaded once), photo finder and options: turns catalog rows into result
    records. The one place rows become tagged rows, in :func:`run_tagging` on this machine and
    in each worker of :mod:`core.tagging.distributed`; call :meth:`close` when done."""

    def __init__(self, folder: Path, *, device: str | None = None, project_files: dict[str, Path] | None = None,
                 feature_store: FeatureStore | None = None):
        run = load_run(folder)
        self.options = TagOptions(**run["options"])
        self.positive = positive_class(run)
        self.finder = PhotoFinder(run, folder, project_files)
        self.predictor = Predictor(run["bundle"], threshold=run.get("threshold"), device=device,
                                   feature_store=feature_store)
        self.photos = 0  # photos given to the model so far

    def tag(self, cells: Mapping[int, Sequence], *,
            should_cancel: Callable[[], bool] | None = None) -> list[tuple] | None:
        """One results record per row (``row number -> its photo columns' cells``, in the
        order of ``options.image_columns``), in the order given; links are fetched here.
        None when ``should_cancel`` said stop while links were being fetched (the rows are
        not done: nothing of them may be kept)."""
        refs = {i: [p for cell in row for p in split_cell(cell)] for i, row in cells.items()}
        resolved = self.finder.resolve(sorted({r for rs in refs.values() for r in rs}), should_cancel)
        if should_cancel is not None and should_cancel():
            return None
        items = [(ref, path) for ref, (path, _) in resolved.items() if path is not None]
        answer = _predict(self.predictor, items)
        self.photos += len(items)
        return [_row_result(i, refs[i], resolved, answer, self.options, self.positive) for i in cells]

    def close(self) -> None:
        self.predictor.close()


def photo_cells(folder: Path) -> dict[int, list]:
    """Every catalog row's photo-column cells (the input of :meth:`RowTagger.tag`), by row number."""
    options = TagOptions(**load_run(folder)["options"])
    rows_frame = catalog_rows(folder)
    columns = [rows_frame[c].tolist() for c in options.image_columns]
    return {i: [column[i] for column in columns] for i in range(len(rows_frame))}


def pending_rows(con: sqlite3.Connection, total: int) -> list[int]:
    """Row numbers not finished yet, in order."""
    done = {r for (r,) in con.execute("SELECT row FROM results")}
    return [i for i in range(total) if i not in done]


def save_results(con: sqlite3.Connection, records: Sequence[tuple]) -> None:
    """Keep finished rows: one transaction per chunk (all of it or none of it); a row already
    kept is never written twice."""
    with con:
        con.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)", records)


def summarise(con: sqlite3.Connection, summary: TagSummary, *, photos: int, started: float) -> TagSummary:
    """Fill ``summary`` from the finished rows, with the speed of this run."""
    summary.seconds = time.time() - started
    summary.photos_per_s = photos / summary.seconds if summary.seconds else 0.0
    for label, review in con.execute("SELECT predicted_label, needs_review FROM results"):
        summary.done += 1
        if label:
            summary.tagged += 1
            summary.counts[label] = summary.counts.get(label, 0) + 1
        else:
            summary.failed += 1
        summary.needs_review += int(review or 0)
    return summary


def run_tagging(
    folder: Path,
    *,
    device: str | None = None,
    project_files: dict[str, Path] | None = None,
    feature_store: FeatureStore | None = None,
    on_progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TagSummary:
    """Tag every row not yet done; safe to call again after any interruption.

    The model is loaded once for the whole run, with the threshold the run was made with.
    ``feature_store`` (a frozen model's features; the project's) spares photos already
    extracted, and keeps those computed now for the next run.
    """
    cells = photo_cells(folder)
    total = len(cells)
    chunk_rows = TagOptions(**load_run(folder)["options"]).chunk_rows
    report = on_progress or (lambda d, t, m: None)
    summary = TagSummary(rows=total)
    started = time.time()
    tagger = RowTagger(folder, device=device, project_files=project_files, feature_store=feature_store)
    con = results_db(folder)
    try:
        todo = pending_rows(con, total)
        report(total - len(todo), total, "Tagging")
        for start in range(0, len(todo), chunk_rows):
            if should_cancel and should_cancel():
                summary.cancelled = True
                break
            rows = todo[start:start + chunk_rows]
            records = tagger.tag({i: cells[i] for i in rows}, should_cancel=should_cancel)
            if records is None:  # cancelled with links left unfetched: this chunk is redone on resume
                summary.cancelled = True
                break
            save_results(con, records)
            report(total - len(todo) + start + len(rows), total, "Tagging")
        return summarise(con, summary, photos=tagger.photos, started=started)
    finally:
        tagger.close()
        con.close()
