"""Catalog exports: read a shop/PIM sheet, find its product id and photo columns, list photos.

Bulk tagging takes the catalog the analyst already has (a Shopify export, a Google Merchant
feed, a PIM workbook...) and gives the same sheet back with tags added. This module reads
such a sheet with :func:`core.inputs.sheets.read_sheet` (so columns and row order are kept exactly),
guesses which column identifies a product and which hold its photos, splits cells that list
several photos, streams every photo reference in row order, and ties local references to
files without leaving the allowed folders. What is done with the photos' tags is
:mod:`core.tagging`'s business.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

from core.base.problems import InputError
from core.inputs.columns import name_key
from core.inputs.labels import normalise_name
from core.inputs.sheets import Sheet, read_sheet

__all__ = [
    "Catalog",
    "ImageRef",
    "catalog_of",
    "guess_columns",
    "image_refs",
    "read_catalog",
    "ref_kind",
    "resolve_local",
    "split_cell",
]

RefKind = Literal["url", "path", "name", "empty"]

_URL_RE = re.compile(r"^https?://", re.IGNORECASE)
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_DRIVE_RE = re.compile(r"^[a-z]:[\\/]", re.IGNORECASE)
_IMAGE_EXT_RE = re.compile(r"\.(jpe?g|jpe|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif)([?#].*)?$", re.IGNORECASE)
_ID_EXACT = frozenset(
    "id sku article article_no article_number product_id productid item_id style style_number "
    "ean gtin upc mpn handle code product_code item_number".split()
)
_ID_TOKENS = frozenset("id sku ean gtin upc mpn handle style".split())
_ID_STEMS = ("artikel", "article", "sku", "ean", "gtin", "product", "item", "style")  # "Artikelnummer"
_IMAGE_TOKENS = frozenset("image images img photo photos picture pic url link src foto bild".split())
_IMAGE_NAME_WORDS = _IMAGE_TOKENS | {"additional", "main", "extra", "alternate", "other", "product", "variant"}
_MAX_LINK_HOPS = 40


@dataclass
class Catalog:
    """A catalog export as read, plus the columns that identify products and their photos.

    ``sheet`` keeps the original columns and row order; ``long_format`` is True when several
    rows share one product id (one photo per row, as in a Shopify export).
    """

    sheet: Sheet
    filename: str
    id_column: str | None
    image_columns: list[str]
    long_format: bool
    row_count: int


@dataclass(frozen=True)
class ImageRef:
    """One photo reference in a catalog cell.

    ``row`` is the frame index, ``sheet_row`` the row number the analyst sees (header = 1).
    ``position`` is the photo's 1-based order within its product (across rows sharing the id
    in long format, across columns and split cells otherwise); 0 for an empty cell.
    """

    row: int
    sheet_row: int
    column: str
    position: int
    value: str
    kind: RefKind


def read_catalog(source: Path | bytes, *, filename: str) -> Catalog:
    """Read a catalog export (CSV/TSV/xlsx) and guess its id and photo columns.

    Raises :class:`InputError` when the file cannot be read or no column holds photos.
    """
    return catalog_of(read_sheet(source, filename=filename, purpose="catalog"))


def catalog_of(sheet: Sheet, *, image_columns: Sequence[str] = ()) -> Catalog:
    """The catalog in a sheet already read: the analyst's ``image_columns`` (guessed when none
    are given) and the guessed product id column.

    Raises :class:`InputError` when a chosen column is not in the sheet or no column holds photos.
    """
    filename = sheet.filename
    missing = [c for c in image_columns if c not in sheet.frame.columns]
    if missing:
        raise InputError(
            f"'{filename}' has no column {', '.join(repr(c) for c in missing)} for the photos. Its columns: "
            f"{', '.join(map(str, sheet.frame.columns))}. Choose the columns with the photos among these."
        )
    if image_columns:
        id_column, image_columns = _guess_id_column(sheet.frame, image_columns), list(image_columns)
    else:
        id_column, image_columns = guess_columns(sheet)
    if not image_columns:
        raise InputError(
            f"No column in '{filename}' holds photo names, paths or links (looked for values "
            "like 'shirt.jpg' or 'https://.../shirt.jpg' and columns named like 'image' or "
            "'image_link'). Add such a column, or export the catalog with its image links."
        )
    long_format = False
    if id_column is not None:
        ids = [v for v in sheet.frame[id_column].tolist() if v]
        long_format = len(ids) != len(set(ids))
    return Catalog(
        sheet=sheet,
        filename=filename,
        id_column=id_column,
        image_columns=image_columns,
        long_format=long_format,
        row_count=len(sheet.frame),
    )


def _looks_like_ref(value: str) -> bool:
    return bool(_SCHEME_RE.match(value)) or bool(_IMAGE_EXT_RE.search(value))


def split_cell(value: str) -> list[str]:
    """A cell's photo references: Google's additional_image_link packs several, comma-separated,
    and so do exports listing "front.jpg, back.jpg" (split only when every piece is a photo)."""
    value = value.strip()
    if "," in value:
        pieces = [p.strip() for p in value.split(",") if p.strip()]
        if len(pieces) > 1 and all(_looks_like_ref(p) for p in pieces):
            return pieces
    return [value] if value else []


def guess_columns(sheet: Sheet) -> tuple[str | None, list[str]]:
    """Guess (product id column, photo columns in sheet order) so the analyst just confirms.

    Photo columns hold mostly image names, paths or links (an all-empty column counts when it
    is named like one, e.g. "image_3"). The id column is named like id/sku/handle/ean/Artikelnummer
    (or is a first column of unique codes) and has mostly distinct values; None when nothing fits.
    """
    frame = sheet.frame
    image_columns: list[str] = []
    for name in frame.columns:
        values = [v for v in frame[name].tolist() if v]
        tokens = set(name_key(name).split("_"))
        if values:
            pieces = [p for v in values for p in split_cell(v)]
            if sum(map(_looks_like_ref, pieces)) >= 0.5 * len(pieces):
                image_columns.append(name)
        elif tokens & _IMAGE_TOKENS and all(t in _IMAGE_NAME_WORDS or t.isdigit() for t in tokens):
            image_columns.append(name)  # "image_3" left empty, but not "Image Alt Text"
    return _guess_id_column(frame, image_columns), image_columns


def _guess_id_column(frame, image_columns: Sequence[str]) -> str | None:
    """The likeliest product id column among those not holding photos (see :func:`guess_columns`)."""
    best: tuple | None = None
    id_column: str | None = None
    for pos, name in enumerate(frame.columns):
        if name in image_columns:
            continue
        key = name_key(name)
        tokens = key.split("_")
        values = [v for v in frame[name].tolist() if v]
        if not values:
            continue
        distinct = len(set(values)) / len(values)
        if key in _ID_EXACT:
            hint = 3
        elif _ID_TOKENS & set(tokens):
            hint = 2
        elif any(t.startswith(_ID_STEMS) for t in tokens):
            hint = 1
        elif pos == 0 and distinct == 1 and not any(" " in v for v in values):
            hint = 0.5  # an unnamed first column of unique codes is usually the product key
        else:
            continue
        if distinct < 0.3:  # long format repeats ids, but a column of 2-3 codes is no id
            continue
        score = (hint, distinct, -pos)
        if best is None or score > best:
            best, id_column = score, name
    return id_column


def ref_kind(value: str) -> RefKind:
    """What a photo reference is: an http(s) "url", a "path" with folders, a bare "name", or "empty"."""
    value = value.strip()
    if not value:
        return "empty"
    if _URL_RE.match(value):
        return "url"
    if "/" in value or "\\" in value or _DRIVE_RE.match(value):
        return "path"
    return "name"


def image_refs(catalog: Catalog) -> Iterator[ImageRef]:
    """Every photo reference in row order, then column order, multi-link cells split."""
    sheet = catalog.sheet
    frame = sheet.frame
    seen: Counter[str] = Counter()
    columns = [c for c in catalog.image_columns if c in frame.columns]
    ids = frame[catalog.id_column].tolist() if catalog.id_column in frame.columns else None
    for i, (index, *cells) in enumerate(frame[columns].itertuples(name=None)):
        product = ids[i] if ids is not None and ids[i] else None
        key = product if catalog.long_format and product is not None else f"\x00row{index}"
        for column, cell in zip(columns, cells, strict=True):
            pieces = split_cell(cell)
            if not pieces:
                yield ImageRef(int(index), sheet.sheet_row(index), column, 0, "", "empty")
                continue
            for piece in pieces:
                seen[key] += 1
                yield ImageRef(int(index), sheet.sheet_row(index), column, seen[key], piece, ref_kind(piece))


def _by_key(names: Mapping[str, Path] | None) -> dict[str, Path | None]:
    """Files keyed by normalise_name; None marks a key two different files share."""
    out: dict[str, Path | None] = {}
    for name, path in (names or {}).items():
        key = normalise_name(name)
        if key:
            out[key] = path if out.get(key, path) == path else None
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve_under(root: str, parts: list[str]) -> str | None:
    """Follow ``parts`` from ``root`` (a realpath) link by link, never stepping outside it."""
    pending = list(parts)
    current = root
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            if not _inside(current, root):
                return None
            continue
        step = os.path.join(current, part)
        if os.path.islink(step):
            hops += 1
            if hops > _MAX_LINK_HOPS:
                return None
            target = os.readlink(step)
            if os.path.isabs(target):
                target = os.path.normpath(target)
                if not _inside(target, root):
                    return None
                current = root
                pending = os.path.relpath(target, root).split(os.sep) + pending
            else:
                pending = target.split(os.sep) + pending
            continue
        current = step
    return current if os.path.isfile(current) else None


def resolve_local(
    ref: ImageRef,
    *,
    zip_names: Mapping[str, Path] | None = None,
    project_names: Mapping[str, Path] | None = None,
    allowed_roots: Sequence[Path] = (),
) -> Path | None:
    """The local file a name/path reference points to, or None.

    Names are matched like label sheets (case, extension and folders ignored) against an
    uploaded zip's files, then the project's photos. Otherwise the path is looked up inside
    ``allowed_roots`` only: ".." parts, paths outside every root and symlinks leading out are
    refused without touching anything outside the roots.
    """
    if ref.kind not in ("name", "path"):
        return None
    key = normalise_name(ref.value)
    for names in (zip_names, project_names):
        found = _by_key(names).get(key)
        if found is not None:
            return found
    text = ref.value.strip().replace("\\", "/")
    if _DRIVE_RE.match(text) or ".." in text.split("/"):
        return None
    for root in allowed_roots:
        root_abs = os.path.normpath(os.path.abspath(root))
        root_real = os.path.realpath(root_abs)
        if os.path.isabs(text):
            target = os.path.normpath(text)
            base = next((r for r in (root_abs, root_real) if _inside(target, r)), None)
            if base is None:
                continue
            parts = os.path.relpath(target, base).split(os.sep)
        else:
            parts = list(PurePath(text).parts)
        resolved = _resolve_under(root_real, parts)
        if resolved is not None:
            return Path(resolved)
    return None
