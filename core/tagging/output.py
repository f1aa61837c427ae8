"""What a tagging run gives back: the tagged sheet, the review queue and the analyst's answers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.base import exports
from core.base.files import atomic_write_text
from core.inputs.images import preview
from core.inputs.sheets import column_letter
from core.learning import bundles
from core.tagging.photos import PhotoFinder, project_photo_files
from core.tagging.run import (
    TagOptions,
    catalog_rows,
    catalog_sheet,
    load_run,
    positive_class,
    results_db,
    results_frame,
)
from core.tagging.tags import combine_scored

__all__ = ["OUTPUT_COLUMNS", "TAG_VALUES", "Download", "downloads", "iter_rows_needing_review", "overrides",
           "review_photos", "review_thumbnails", "set_override", "tag_names", "write_output"]

OUTPUT_COLUMNS = ("predicted_label", "confidence", "needs_review", "tag_error", "model_id")
TAG_VALUES = ("names", "codes")  # what the tag columns of the download hold


def tag_names(folder: Path, names: Mapping[str, str] | None = None) -> dict[str, str]:
    """The readable name of each of the run's classes that has one other than its code: the
    ``names`` given (the project's, as the pages show them), else the ones in the model file."""
    if names is None:
        names = bundles.load_bundle(load_run(folder)["bundle"])[0].class_display_names
    return {str(code): str(name).strip() for code, name in names.items() if str(name).strip() not in ("", str(code))}


def write_output(folder: Path, out: Path, *, fmt: str | None = None, overrides: dict[int, str] | None = None,
                 tags_as: str = "names", names: Mapping[str, str] | None = None) -> Path:
    """The catalog with the tag columns added, as CSV, XLSX or Parquet (``fmt``, else the name's
    suffix): every row and column unchanged and in order, cells exactly as written (spaces kept),
    blank rows kept where they were. The file is written by :mod:`core.base.exports`, so no
    cell ever runs as a formula in a spreadsheet program (a CSV cell that could gets a leading
    apostrophe) and a table too long for Excel raises its ``TooManyRowsError``.

    The file starts with the header row (a sheet without one gets "Column A", "Column B"...):
    lines above the header, Excel's ``sep=;`` line or a title, are left out, so the file opens
    as one plain table, and so are blank rows after the last one with content. A CSV keeps the
    catalog's delimiter and encoding (UTF-8 with the BOM Excel needs to show accents); an Excel
    catalog's CSV is comma-separated. ``overrides`` are the analyst's answers, marked "reviewed".

    ``tags_as="names"`` writes the classes' readable names (``names``, else the model's; see
    :func:`tag_names`) in the tag columns, with the codes of the label sheet kept beside them
    in ``predicted_code`` when some class has a name; ``"codes"`` writes the codes only.
    """
    table, csv_options = _tagged_table(folder, overrides, tags_as=tags_as, names=names)
    return exports.write_table(table, out, fmt=fmt, **csv_options)


@dataclass(frozen=True)
class Download:
    """One file of the tagged catalog for the Tag page: ``data``, or why it is ``refused``."""

    fmt: str
    file_name: str
    data: bytes | None
    refused: str | None = None


def downloads(folder: Path, *, overrides: dict[int, str] | None = None, tags_as: str = "names",
              names: Mapping[str, str] | None = None) -> list[Download]:
    """The tagged catalog as CSV, Excel and Parquet (the table built once), as :func:`write_output`
    writes them; a format that cannot hold the table (Excel's row limit) is refused, with why."""
    run = load_run(folder)
    stem = Path(run["catalog_name"]).stem + "-tagged"
    own = Path(run["catalog"]).suffix
    table, csv_options = _tagged_table(folder, overrides, tags_as=tags_as, names=names)
    out = []
    for fmt, suffix in (("csv", own if own in (".csv", ".tsv", ".txt") else ".csv"), ("xlsx", ".xlsx"),
                        ("parquet", ".parquet")):
        try:
            out.append(Download(fmt, stem + suffix, exports.table_bytes(table, fmt, **csv_options)))
        except exports.TooManyRowsError as exc:
            out.append(Download(fmt, stem + suffix, None, str(exc)))
    return out


def _tagged_table(folder: Path, overrides: dict[int, str] | None, *, tags_as: str = "names",
                  names: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """The output table and the CSV options that keep the catalog's delimiter and encoding."""
    if tags_as not in TAG_VALUES:
        raise ValueError(f"tags_as must be one of {TAG_VALUES}, not {tags_as!r}.")
    run = load_run(folder)
    sheet = catalog_sheet(folder)
    results = results_frame(folder)
    width = len(sheet.raw_rows[0]) if sheet.raw_rows else 0
    header = sheet.raw_header or [f"Column {column_letter(i)}" for i in range(width)]
    added = pd.DataFrame(index=range(len(sheet.raw_rows)))
    added["predicted_label"] = results["predicted_label"].reindex(added.index).fillna("")
    added["confidence"] = results["confidence"].reindex(added.index)
    added["needs_review"] = results["needs_review"].reindex(added.index).map({1: "yes", 0: "no"}).fillna("")
    added["tag_error"] = results["tag_error"].reindex(added.index).fillna("not tagged yet")
    for row, label in (overrides or {}).items():
        added.loc[row, ["predicted_label", "needs_review"]] = [label, "reviewed"]
    options = TagOptions(**run["options"])
    rows = catalog_rows(folder)
    if options.id_column and options.id_column in rows.columns:
        # One product over several rows (one photo per row): one tag for the whole product.
        positive = positive_class(run)
        by_row = pd.DataFrame({"id": rows[options.id_column].to_numpy(), "tag": added["predicted_label"].to_numpy(),
                               "conf": added["confidence"].to_numpy()})
        product = {}
        for product_id, group in by_row.groupby("id", sort=False):
            tags = [(t, float(c)) for t, c in zip(group["tag"], group["conf"]) if t]
            product[product_id] = combine_scored(tags, rule=options.rule, positive=positive)[0] if tags else ""
        added["product_tag"] = [product.get(v, "") for v in rows[options.id_column]]
    readable = tag_names(folder, names) if tags_as == "names" else {}
    if readable:
        codes = added.pop("predicted_label")
        added.insert(0, "predicted_label", codes.map(lambda c: readable.get(c, c)))
        added.insert(1, "predicted_code", codes)
        if "product_tag" in added:
            added["product_tag"] = added["product_tag"].map(lambda c: readable.get(c, c))
    added["model_id"] = run["model_id"]
    output = pd.concat([pd.DataFrame(sheet.raw_rows, columns=range(width)), added], axis=1)
    output.columns = [*header, *added.columns]
    return output, {"delimiter": sheet.delimiter or ",", "encoding": sheet.encoding or "utf-8"}


def iter_rows_needing_review(folder: Path, *, limit: int = 200) -> Iterator[dict]:
    """Rows flagged for review or failed, for the review queue; ``sheet_row`` is the row
    number the analyst sees in the catalog (header = 1)."""
    first_data_row = load_run(folder).get("first_data_row", 2)
    con = results_db(folder)
    try:
        for row, label, conf, error, photos in con.execute(
            "SELECT row, predicted_label, confidence, tag_error, photos FROM results "
            "WHERE needs_review = 1 ORDER BY confidence IS NULL, confidence LIMIT ?", (limit,)
        ):
            yield {"row": row, "sheet_row": first_data_row + row, "predicted_label": label, "confidence": conf,
                   "tag_error": error, "photos": json.loads(photos or "[]")}
    finally:
        con.close()


def overrides(folder: Path) -> dict[int, str]:
    """The analyst's answers so far, by row number."""
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
    finder = PhotoFinder(load_run(folder), folder, project_photo_files(project) if project is not None else None)
    return {item["row"]: next((p for ref in item["photos"] if (p := finder.on_disk(ref)) is not None), None)
            for item in items}


def review_thumbnails(folder: Path, items: Sequence[dict], project=None, *, size: int = 220) -> dict[int, bytes]:
    """A small JPEG of each row's first photo on this computer (see :func:`review_photos`); a row
    whose photo is missing or cannot be decoded (often why it waits for review) gets the placeholder."""
    return {row: preview(path, size=size) for row, path in review_photos(folder, items, project).items()}
