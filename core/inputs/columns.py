"""Which column of a sheet is which: the photo names, the labels, the product (group).

Guesses only, so the analyst usually just confirms: by what the values look like first, by
the column's name second. Label sheets (:mod:`core.inputs.labels`) and catalog exports
(:mod:`core.inputs.catalog`) name their columns the same way (:func:`name_key`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.inputs.sheets import Sheet, looks_like_image_ref

__all__ = ["guess_columns", "guess_group_column", "labels_look_coded", "name_key"]

_IMAGE_NAMES = frozenset(
    "file files filename file_name image images image_file image_file_name image_filename image_name "
    "imagename image_path image_url img img_name photo photos photo_name photo_file picture path "
    "filepath file_path url link sku asset src".split()
)


_IMAGE_TOKENS = frozenset(
    "file filename image img photo picture pic path url sku foto bild imagen imagem immagine".split()
)


_LABEL_NAMES = frozenset(
    "label labels class classes class_name label_name tag tags category categories has_person "
    "is_person with_person person human people y target annotation on_model".split()
)


_LABEL_TOKENS = frozenset("label class tag category person human people target etiqueta etiquette klasse".split())


def name_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.casefold()).strip("_")


def _name_hint(name: str, exact: frozenset[str], tokens: frozenset[str]) -> int:
    key = name_key(name)
    if key in exact:
        return 2
    return 1 if tokens & set(key.split("_")) else 0


def guess_columns(sheet: Sheet) -> tuple[str | None, str | None]:
    """Guess (photo-name column, label column) so the analyst usually just confirms.

    The photo column is the one whose values look like image file names, paths or URLs
    (or, failing that, is named like one); the label column is a different column with few
    distinct values, preferring names like "label"/"class" and coded values like 0/1.
    Either is None when nothing fits.
    """
    frame = sheet.frame
    stats = {}
    for name in frame.columns:
        values = [v for v in frame[name].tolist() if v]
        stats[name] = (
            values,
            sum(map(looks_like_image_ref, values)) / len(values) if values else 0.0,
            len(set(values)),
        )

    image_col: str | None = None
    by_values = [
        (frac, _name_hint(n, _IMAGE_NAMES, _IMAGE_TOKENS), -pos, n)
        for pos, (n, (_, frac, _)) in enumerate(stats.items())
        if frac >= 0.5
    ]
    if by_values:
        image_col = max(by_values)[3]
    else:
        by_name = [
            (hint, distinct / len(values) if values else 0.0, -pos, n)
            for pos, (n, (values, _, distinct)) in enumerate(stats.items())
            if (hint := _name_hint(n, _IMAGE_NAMES, _IMAGE_TOKENS))
        ]
        if by_name:
            image_col = max(by_name)[3]
        else:
            image_col = next(
                (
                    n
                    for n, (values, _, distinct) in stats.items()
                    if len(values) >= 2 and distinct >= 0.9 * len(values) and not labels_look_coded(set(values))
                ),
                None,
            )

    label_col: str | None = None
    best: tuple | None = None
    rows = max(len(frame), 1)
    for pos, (name, (values, frac, distinct)) in enumerate(stats.items()):
        if name == image_col or not values or frac >= 0.5:
            continue
        hint = _name_hint(name, _LABEL_NAMES, _LABEL_TOKENS)
        # A column named like a label ("Label", "Has person") is trusted up to 100 classes even
        # in a tiny sheet; any other column must repeat its values to look like classes.
        limit = 100 if hint else max(2, min(50, len(values) // 2))
        if distinct > limit:
            continue
        score = (hint * 1.5 + labels_look_coded(set(values)) + len(values) / rows, -distinct, -pos)
        if best is None or score > best:
            best, label_col = score, name
    return image_col, label_col


_GROUP_NAMES = frozenset(
    "product product_id productid product_code product_name group group_id groupid item item_id itemid article article_id "
    "article_number style style_id style_number style_code model_id model_number parent parent_id parent_sku master_sku "
    "family listing listing_id".split())


_GROUP_TOKENS = frozenset("product group item article style parent listing produit produkt articulo".split())


def guess_group_column(sheet: Sheet, *, image_column: str | None, label_column: str | None) -> str | None:
    """The column that says which product (group) each photo shows, or None: named like one
    ("product_id", "Style", "group"), neither the photo nor the label column, filled on most
    rows, with values that repeat (several photos per product) but are not a handful of classes."""
    best: tuple | None = None
    choice: str | None = None
    for pos, name in enumerate(sheet.frame.columns):
        hint = _name_hint(name, _GROUP_NAMES, _GROUP_TOKENS)
        values = [v for v in sheet.frame[name].tolist() if v]
        if name in (image_column, label_column) or not hint or len(values) < max(4, len(sheet.frame) // 2):
            continue
        if 3 <= len(set(values)) < len(values) and (best is None or (hint, len(values), -pos) > best):
            best, choice = (hint, len(values), -pos), name
    return choice


def labels_look_coded(classes: Iterable[str]) -> bool:
    """True when labels are codes (0/1, true/false, yes/no, small integers), not names.

    The UI then asks the analyst what each code means, so results read "person", not "1".
    """
    values = {str(c).strip().casefold() for c in classes}
    values.discard("")
    if not values:
        return False
    for pair in ({"0", "1"}, {"true", "false"}, {"yes", "no"}, {"y", "n"}, {"t", "f"}):
        if values <= pair:
            return True
    return all(re.fullmatch(r"-?\d{1,2}", v) for v in values)
