"""Bulk tagging of a catalog export: streaming, checkpointed, resumable, no row ever lost.

A tagging run lives in one folder::

    <run>/run.json         what was asked: catalog file, model, columns, rule, review band
    <run>/catalog.<ext>    the catalog as uploaded (never modified)
    <run>/results.db       one row per finished catalog row (SQLite, committed per chunk)

Rows are tagged in chunks; each chunk's results are committed in one transaction keyed
by the row number, so a crash (even ``kill -9``) loses at most the chunk in flight, and
a resumed run skips finished rows and can never write one twice. The output is the
original sheet, every row and column unchanged and in order, plus ``predicted_label``,
``confidence``, ``needs_review``, ``tag_error`` and ``model_id``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from core.base.files import atomic_write_bytes, atomic_write_text
from core.base.problems import InputError
from core.learning import bundles

IMAGE_ROOTS_ENV = "CATALOG_LENS_IMAGE_ROOTS"
OUTPUT_COLUMNS = ("predicted_label", "confidence", "needs_review", "tag_error", "model_id")
Progress = Callable[[int, int, str], None]


@dataclass
class TagOptions:
    """What the analyst chose: which columns hold the photos, how several photos combine,
    and which confidences count as "needs review"."""

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


# ----------------------------------------------------------------------- the sheet


def read_original(path: Path) -> tuple[pd.DataFrame, dict]:
    """The catalog exactly as written: every cell a string, nothing stripped or guessed away.

    Returns the frame and how to write it back (delimiter, encoding, format).
    """
    from core.inputs.sheets import read_sheet

    data = path.read_bytes()
    sheet = read_sheet(data, filename=path.name)  # detects encoding, delimiter, header
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        frame = pd.read_excel(io.BytesIO(data), dtype=str, keep_default_na=False,
                              header=0 if sheet.has_header else None)
        fmt = {"format": "xlsx"}
    else:
        encoding = sheet.encoding or "utf-8"
        text = data.decode(encoding)
        frame = pd.read_csv(io.StringIO(text), sep=sheet.delimiter or ",", dtype=str, keep_default_na=False,
                            header=0 if sheet.has_header else None, skip_blank_lines=False, engine="python",
                            quoting=csv.QUOTE_MINIMAL)
        fmt = {"format": "csv", "delimiter": sheet.delimiter or ",", "encoding": encoding}
    if not sheet.has_header:
        frame.columns = list(sheet.frame.columns)[: frame.shape[1]] + [
            f"Column {i + 1}" for i in range(len(sheet.frame.columns), frame.shape[1])]
    return frame, fmt


# ---------------------------------------------------------------------- the run


def create_run(
    folder: Path, *, catalog_path: Path, bundle_path: Path, options: TagOptions,
    images_zip: Path | None = None, images_dir: Path | None = None,
) -> Path:
    """Prepare a run folder (copies the catalog); returns it."""
    bundle, _ = bundles.load_bundle(bundle_path)
    folder.mkdir(parents=True, exist_ok=True)
    catalog_copy = folder / f"catalog{catalog_path.suffix.lower() or '.csv'}"
    atomic_write_bytes(catalog_copy, catalog_path.read_bytes())
    frame, _ = read_original(catalog_copy)
    missing = [c for c in options.image_columns if c not in frame.columns]
    if not options.image_columns or missing:
        raise InputError(f"The catalog has no column {', '.join(missing) or '(none chosen)'} for the photos. "
                         f"Its columns: {', '.join(map(str, frame.columns))}.")
    atomic_write_text(folder / "run.json", json.dumps({
        "catalog": catalog_copy.name,
        "catalog_name": catalog_path.name,
        "bundle": str(Path(bundle_path).resolve()),
        "model_id": bundle.id,
        "options": asdict(options),
        "images_zip": str(images_zip) if images_zip else None,
        "images_dir": str(images_dir) if images_dir else None,
        "rows": len(frame),
        "created_at": time.time(),
    }, indent=2))
    _db(folder).close()
    return folder


def _db(folder: Path) -> sqlite3.Connection:
    con = sqlite3.connect(folder / "results.db", timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(
        "CREATE TABLE IF NOT EXISTS results (row INTEGER PRIMARY KEY, predicted_label TEXT, "
        "confidence REAL, needs_review INTEGER, tag_error TEXT, photos TEXT)"
    )
    return con


def load_run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _split_cell(value: str) -> list[str]:
    value = value.strip()
    if not value:
        return []
    if "," in value and value.count("http") > 1:  # feeds list extra image URLs in one cell
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


class _Resolver:
    """Turns a photo reference (file name, relative path or URL) into a local file or a reason."""

    def __init__(self, run: dict, folder: Path, project_files: dict[str, Path] | None):
        from core.inputs.labels import normalise_name

        self._norm = normalise_name
        self.files: dict[str, Path] = {}
        self._tmp = folder / "photos"
        if run.get("images_zip"):
            from core.inputs.uploads import unpack_zip

            unpacked = folder / "photos-unpacked"
            if not (unpacked / ".done").exists():
                result = unpack_zip(Path(run["images_zip"]), unpacked, archive_name=Path(run["images_zip"]).name)
                index = {f.name: str(f.path) for f in result.files}
                atomic_write_text(unpacked / "index.json", json.dumps(index))
                (unpacked / ".done").touch()
            for name, path in json.loads((unpacked / "index.json").read_text()).items():
                self._add(name, Path(path))
        if run.get("images_dir"):
            root = Path(run["images_dir"])
            for path in root.rglob("*"):
                if path.is_file():
                    self._add(path.relative_to(root).as_posix(), path)
        for name, path in (project_files or {}).items():
            self._add(name, path)
        self._fetcher = None
        # Folders on the server the catalog may point into by path (configuration, not user input).
        self.roots = [Path(p) for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p]

    def _add(self, name: str, path: Path) -> None:
        self.files.setdefault(self._norm(name), path)
        self.files.setdefault(self._norm(Path(name).name), path)

    def resolve(self, refs: Sequence[str]) -> dict[str, tuple[Path | None, str]]:
        out: dict[str, tuple[Path | None, str]] = {}
        urls = [r for r in refs if r.lower().startswith(("http://", "https://"))]
        for ref in refs:
            if ref in urls:
                continue
            path = self.files.get(self._norm(ref))
            if path is None and self.roots:
                from core.inputs.catalog import ImageRef, ref_kind, resolve_local

                path = resolve_local(ImageRef(0, 0, "", 0, ref, ref_kind(ref)), allowed_roots=self.roots)
            out[ref] = (path, "" if path else f"no photo named {ref!r} was uploaded with the catalog")
        if urls:
            if self._fetcher is None:
                from core.inputs.fetch import Fetcher

                self._fetcher = Fetcher(self._tmp)
            for result in self._fetcher.fetch_many(urls):
                out[result.url] = (result.path, "" if result.path else f"download failed: {result.error}")
        return out


def _combine(tags: list[tuple[str, float]], rule: str, positive: str | None) -> tuple[str, float]:
    """One tag and its confidence for a row or product with several photos.

    The tag follows :func:`core.inputs.catalog.combine`; the confidence is that of the least sure
    photo when every photo had to agree (no person under "any", a person under "all"),
    else of the surest photo carrying the tag.
    """
    from core.inputs.catalog import combine

    label = combine([t for t, _ in tags], rule=rule, positive=positive or "")
    confs = [c for t, c in tags if t == label]
    every_photo_counts = (rule == "any" and label != positive) or (rule == "all" and label == positive)
    return label, (min(confs) if every_photo_counts else max(confs))


def run_tagging(
    folder: Path,
    *,
    device: str | None = None,
    project_files: dict[str, Path] | None = None,
    on_progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TagSummary:
    """Tag every row not yet done; safe to call again after any interruption."""
    from core.learning.predictor import predict_images

    run = load_run(folder)
    options = TagOptions(**run["options"])
    bundle, _ = bundles.load_bundle(run["bundle"])
    frame, _ = read_original(folder / run["catalog"])
    report = on_progress or (lambda d, t, m: None)
    resolver = _Resolver(run, folder, project_files)
    summary = TagSummary(rows=len(frame))
    started = time.time()
    photos = 0
    con = _db(folder)
    try:
        done = {r for (r,) in con.execute("SELECT row FROM results")}
        todo = [i for i in range(len(frame)) if i not in done]
        report(len(done), len(frame), "Tagging")
        for start in range(0, len(todo), options.chunk_rows):
            if should_cancel and should_cancel():
                summary.cancelled = True
                break
            rows = todo[start:start + options.chunk_rows]
            refs = {i: [v for c in options.image_columns for v in _split_cell(str(frame.iat[i, frame.columns.get_loc(c)]))]
                    for i in rows}
            resolved = resolver.resolve(sorted({r for rs in refs.values() for r in rs}))
            items = [(ref, path) for ref, (path, _) in resolved.items() if path is not None]
            predictions = predict_images(run["bundle"], items, device=device) if items else pd.DataFrame()
            answer = {r.image: (r.predicted_label, r.confidence, r.error) for r in predictions.itertuples()}
            photos += len(items)
            records = []
            for i in rows:
                tags, reasons = [], []
                for ref in refs[i]:
                    path, why = resolved[ref]
                    if path is None:
                        reasons.append(why)
                    elif answer[ref][2]:
                        reasons.append(f"{ref}: {answer[ref][2]}")
                    else:
                        tags.append((answer[ref][0], float(answer[ref][1])))
                if not refs[i]:
                    reasons.append("the row has no photo")
                if tags:
                    label, conf = _combine(tags, options.rule, bundle.positive)
                    records.append((i, label, round(conf, 4), int(conf < options.review_below), "; ".join(reasons),
                                    json.dumps(refs[i])))
                else:
                    records.append((i, "", None, 1, "; ".join(reasons) or "no usable photo", json.dumps(refs[i])))
            with con:  # one transaction per chunk: all of it or none of it
                con.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)", records)
            report(len(done) + start + len(rows), len(frame), "Tagging")
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
    finally:
        con.close()
    return summary


def results_frame(folder: Path) -> pd.DataFrame:
    """The finished rows' results, by catalog row number."""
    con = _db(folder)
    try:
        return pd.read_sql_query("SELECT * FROM results ORDER BY row", con).set_index("row")
    finally:
        con.close()


def write_output(folder: Path, out: Path, *, fmt: str | None = None, overrides: dict[int, str] | None = None) -> Path:
    """The original catalog with the tag columns added, every row kept, as CSV or XLSX."""
    run = load_run(folder)
    frame, how = read_original(folder / run["catalog"])
    results = results_frame(folder)
    added = pd.DataFrame(index=range(len(frame)))
    added["predicted_label"] = results["predicted_label"].reindex(added.index).fillna("")
    added["confidence"] = results["confidence"].reindex(added.index)
    added["needs_review"] = results["needs_review"].reindex(added.index).map({1: "yes", 0: "no"}).fillna("")
    added["tag_error"] = results["tag_error"].reindex(added.index).fillna("not tagged yet")
    for row, label in (overrides or {}).items():
        added.loc[row, ["predicted_label", "needs_review"]] = [label, "reviewed"]
    options = TagOptions(**run["options"])
    if options.id_column and options.id_column in frame.columns:
        # One product over several rows (one photo per row): one tag for the whole product.
        bundle, _ = bundles.load_bundle(run["bundle"])
        rows = pd.DataFrame({"id": frame[options.id_column].to_numpy(), "tag": added["predicted_label"].to_numpy(),
                             "conf": added["confidence"].to_numpy()})
        product = {}
        for product_id, group in rows.groupby("id", sort=False):
            tags = [(t, float(c)) for t, c in zip(group["tag"], group["conf"]) if t]
            product[product_id] = _combine(tags, options.rule, bundle.positive)[0] if tags else ""
        added["product_tag"] = [product.get(v, "") for v in frame[options.id_column]]
    added["model_id"] = run["model_id"]
    output = pd.concat([frame.reset_index(drop=True), added.reset_index(drop=True)], axis=1)
    fmt = fmt or ("xlsx" if out.suffix.lower() in (".xlsx", ".xlsm") else "csv")
    if fmt == "xlsx":
        buf = io.BytesIO()
        output.to_excel(buf, index=False)
        atomic_write_bytes(out, buf.getvalue())
    else:
        encoding = how.get("encoding", "utf-8")
        if encoding.lower().replace("_", "-") in ("utf-8", "utf8", "ascii"):
            encoding = "utf-8-sig"  # Excel opens UTF-8 correctly only with the BOM
        text = output.to_csv(index=False, sep=how.get("delimiter", ","), lineterminator="\r\n")
        atomic_write_bytes(out, text.encode(encoding, errors="replace"))
    return out


def iter_rows_needing_review(folder: Path, *, limit: int = 200) -> Iterator[dict]:
    """Rows flagged for review or failed, for the review queue."""
    con = _db(folder)
    try:
        for row, label, conf, error, photos in con.execute(
            "SELECT row, predicted_label, confidence, tag_error, photos FROM results "
            "WHERE needs_review = 1 ORDER BY confidence IS NULL, confidence LIMIT ?", (limit,)
        ):
            yield {"row": row, "predicted_label": label, "confidence": conf, "tag_error": error,
                   "photos": json.loads(photos or "[]")}
    finally:
        con.close()


# ------------------------------------------------------------------ project runs


def project_run_folder(project, run_id: str) -> Path:
    return project.path("tagging", run_id)


def start_project_run(project, *, catalog_name: str, catalog_data: bytes, bundle_path: Path,
                      options: TagOptions, zip_data: bytes | None = None, images_dir: Path | None = None) -> str:
    """Keep an uploaded catalog (and its photo zip) in the project and prepare a run; returns its id.

    ``images_dir`` (command line only) is a folder on this computer read in place for the photos.
    """
    run_id = time.strftime("%Y%m%d-%H%M%S")
    folder = project_run_folder(project, run_id)
    upload = folder / "upload"
    upload.mkdir(parents=True, exist_ok=True)
    catalog_path = upload / (Path(catalog_name).name or "catalog.csv")
    atomic_write_bytes(catalog_path, catalog_data)
    zip_path = None
    if zip_data:
        zip_path = upload / "photos.zip"
        atomic_write_bytes(zip_path, zip_data)
    if options.id_column is None:
        options.id_column = product_id_column(catalog_path)
    create_run(folder, catalog_path=catalog_path, bundle_path=bundle_path, options=options, images_zip=zip_path,
               images_dir=Path(images_dir).resolve() if images_dir else None)
    project.set_meta("tagging_run", run_id)
    return run_id


def project_photo_files(project) -> dict[str, Path]:
    """Photos already in the project, by every name they were uploaded under."""
    files = project.names().merge(project.images()[["sha", "ext"]], on="sha")
    return {name: project.image_path(sha, ext) for name, sha, ext in zip(files["name"], files["sha"], files["ext"])}


def overrides(folder: Path) -> dict[int, str]:
    path = folder / "overrides.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def set_override(folder: Path, row: int, label: str | None) -> None:
    """The analyst's answer for one reviewed row (None removes it); lands in the output."""
    current = overrides(folder)
    if label is None:
        current.pop(row, None)
    else:
        current[row] = label
    atomic_write_text(folder / "overrides.json", json.dumps({str(k): v for k, v in current.items()}))


def review_photos(folder: Path, items: Sequence[dict], project=None) -> dict[int, Path | None]:
    """The first photo of each row that is on this computer, for thumbnails: a local file, or
    the run's own download of a link (links are never fetched again here)."""
    from core.inputs.fetch import Fetcher

    run = load_run(folder)
    resolver = _Resolver(run, folder, project_photo_files(project) if project is not None else None)
    downloads = Fetcher(resolver._tmp)  # the cache the run downloaded its links into
    out: dict[int, Path | None] = {}
    for item in items:
        out[item["row"]] = next((path for ref in item["photos"] if (path := (
            downloads.cached(ref) if ref.lower().startswith(("http://", "https://"))
            else resolver.files.get(resolver._norm(ref)))) is not None), None)
    return out


NOT_TAGGED = "could not be tagged"


def final_labels(results: pd.DataFrame, answers: Mapping[int, str]) -> pd.Series:
    """Each finished row's tag (``results_frame``) with the analyst's ``answers`` (``overrides``)
    in place of the model's ("" where there is no tag)."""
    final = results["predicted_label"].copy()
    for row, label in answers.items():
        if row in final.index:
            final[row] = label
    return final


def _ranked(found, names: dict[str, str], order: Sequence[str]) -> list[str]:
    first = [names.get(c, c) for c in order]
    return [k for k in first + sorted(set(found) - set(first) - {NOT_TAGGED}) + [NOT_TAGGED] if k in found]


def tag_counts(final: pd.Series, *, names: dict[str, str] | None = None, order: Sequence[str] = ()) -> dict[str, int]:
    """Rows per tag, by display name, classes in ``order`` first and the failures last."""
    names = names or {}
    found = final.map(lambda t: names.get(t, t) if t else NOT_TAGGED).value_counts()
    return {k: int(found[k]) for k in _ranked(set(found.index), names, order)}


def share_by(groups: pd.Series, tags: pd.Series, *, names: dict[str, str] | None = None, top: int = 15,
             order: Sequence[str] = ()) -> pd.DataFrame:
    """Counts of each tag per group (e.g. per category), the ``top`` largest groups first."""
    names = names or {}
    frame = pd.DataFrame({"group": groups.reset_index(drop=True), "tag": tags.reindex(range(len(groups))).fillna("")})
    frame["tag"] = frame["tag"].map(lambda t: names.get(t, t) if t else NOT_TAGGED)
    table = pd.crosstab(frame["group"], frame["tag"])
    table = table[_ranked(set(table.columns), names, order)]
    return table.loc[table.sum(axis=1).sort_values(ascending=False, kind="stable").index[:top]]


def add_reviews_to_training(project, folder: Path) -> int:
    """Add the reviewed rows' photos, with the analyst's answers, to the project's labels."""
    fixed = overrides(folder)
    if not fixed:
        return 0
    results = results_frame(folder)
    items = [{"row": row, "photos": json.loads(results.loc[row, "photos"] or "[]")} for row in fixed if row in results.index]
    paths = review_photos(folder, items, project)
    added = 0
    for item in items:
        path = paths.get(item["row"])
        if path is None:
            continue
        sha, _ = project.add_image(path, name=f"tagging/{Path(item['photos'][0]).name}", upload=f"tagging:{folder.name}")
        project.set_override(sha, label=fixed[item["row"]])
        added += 1
    return added


def product_id_column(catalog_path: Path) -> str | None:
    """The product id column when the export lists one photo per row (several rows per product)."""
    from core.inputs.catalog import read_catalog

    try:
        found = read_catalog(catalog_path.read_bytes(), filename=catalog_path.name)
    except InputError:
        return None
    return found.id_column if found.long_format else None
