"""Tags, once the model has answered: several photos folded into one tag, and the tallies
the Tag page and the report show (rows per tag, tags per catalog category)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import pandas as pd

from core.learning import novelty

__all__ = ["COMBINE_RULES", "MOSTLY_UNLIKE", "NOT_TAGGED", "combine", "combine_scored", "final_labels", "share_by",
           "split_columns", "tag_counts", "unlike_rows"]

COMBINE_RULES = ("any", "all", "first", "majority")
NOT_TAGGED = "could not be tagged"
# From this share of tagged rows unlike the training photos up, the catalog as a whole is unlike
# them (e.g. 245 of 300 phone photos of garments on rugs, tagged by a model of studio shots):
# the Tag page says so before its review list.
MOSTLY_UNLIKE = 0.25

_CATEGORY_NAMES = re.compile(r"categ|type|department|collection|gender|segment|family|group|season|range|usage",
                             re.IGNORECASE)


def combine(tags: Sequence[str | None], *, rule: str = "any", positive: str) -> str | None:
    """One tag for a product from its photos' tags.

    "any": ``positive`` if any photo has it (e.g. "any photo shows a person"); "all": only if
    every photo has it; "first": the first photo decides; "majority": ``positive`` if more
    than half the photos have it (a tie is not a majority). Failed photos (None) are ignored;
    None when every photo failed. Otherwise the most common other tag is returned.
    """
    if rule not in COMBINE_RULES:
        raise ValueError(f"Unknown combine rule {rule!r}; expected one of {', '.join(COMBINE_RULES)}.")
    known = [t for t in tags if t is not None]
    if not known:
        return None
    if rule == "first":
        return known[0]
    hits = sum(t == positive for t in known)
    others = [t for t in known if t != positive]
    is_positive = {
        "any": hits > 0,
        "all": hits == len(known),
        "majority": hits * 2 > len(known),
    }[rule]
    if is_positive or not others:
        return positive
    return Counter(others).most_common(1)[0][0]


def combine_scored(tags: list[tuple[str, float]], *, rule: str, positive: str | None) -> tuple[str, float]:
    """One tag and its confidence for a row or product with several (tag, confidence) photos.

    The tag follows :func:`combine`; the confidence is that of the least sure photo when every
    photo had to agree (no person under "any", a person under "all"), else of the surest photo
    carrying the tag.
    """
    label = combine([t for t, _ in tags], rule=rule, positive=positive or "")
    confs = [c for t, c in tags if t == label]
    every_photo_counts = (rule == "any" and label != positive) or (rule == "all" and label == positive)
    return label, (min(confs) if every_photo_counts else max(confs))


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


def _category_like(frame: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """Columns that look like a category (2-30 distinct values, not photo references), likeliest first."""
    found = []
    for name in frame.columns:
        if name in exclude:
            continue
        values = frame[name].dropna().astype(str).str.strip()
        values = values[values != ""]
        distinct = values.nunique()
        if (2 <= distinct <= 30 and distinct < max(3, len(values) // 2)
                and not values.str.contains("/|\\.jpe?g", case=False).any()):
            found.append(name)
    return sorted(found, key=lambda c: not _CATEGORY_NAMES.search(c))


def split_columns(frame: pd.DataFrame, *, image_columns: Sequence[str],
                  saved: str | None = None) -> tuple[list[str], str | None]:
    """The columns a tagged catalog's counts can be split by (category-like ones first) and the
    one to use: ``saved`` (the analyst's choice; "" for no split) when still a column, else the
    likeliest category, else None. ``frame``'s column names must be strings."""
    likely = _category_like(frame, image_columns)
    columns = likely + [c for c in frame.columns if c not in likely and c not in image_columns]
    if saved == "":
        return columns, None
    return columns, saved if saved in columns else (likely[0] if likely else None)


def unlike_rows(results: pd.DataFrame) -> tuple[int, int]:
    """(tagged rows whose photo is unlike the training photos, so their tag is a guess
    (:mod:`core.learning.novelty`), tagged rows) of a tagging run's results."""
    tagged = results["predicted_label"].fillna("").astype(str) != ""
    unlike = results["tag_error"].fillna("").astype(str).str.contains(novelty.REASON, regex=False)
    return int((tagged & unlike).sum()), int(tagged.sum())
