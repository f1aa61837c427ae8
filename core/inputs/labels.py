"""Label sheets: find their columns, tie their rows to photos, check they can train a model.

The sheet itself is read by :func:`core.inputs.sheets.read_sheet` and its columns guessed by
:mod:`core.inputs.columns`. This module matches the rows to the uploaded photos
and says, row by row, what could not be used and why. Nothing here raises on a single bad
row: rows become :class:`~core.base.problems.Problem` entries.
"""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from core.base.problems import InputError, Problem
from core.inputs.images import PHOTO_NAME_EXTENSIONS
from core.inputs.sheets import (  # Sheet and read_sheet are re-exported: a label sheet is read here
    INTEGRAL_RE,
    INVISIBLE_CHARS,
    QUERY_AFTER_EXT_RE,
    URL_RE,
    Sheet,
    read_sheet,
)

__all__ = [
    "MatchResult",
    "Sheet",
    "class_display_defaults",
    "match_labels",
    "normalise_name",
    "read_sheet",
    "training_blockers",
]


# --------------------------------------------------------------------------- matching


def _ref_parts(ref: str) -> list[str]:
    """Path components of a photo reference, normalised for matching (see normalise_name)."""
    text = ref.strip().strip(INVISIBLE_CHARS)
    if URL_RE.match(text):
        text = urlsplit(text).path
    else:
        text = QUERY_AFTER_EXT_RE.sub(r"\1", text)
    text = unquote(text).replace("\\", "/")
    parts = []
    for part in text.split("/"):
        part = part.strip()
        if part in {"", "."}:
            continue
        part = unicodedata.normalize("NFC", unicodedata.normalize("NFC", part).casefold())
        parts.append(part)
    if parts:
        last = parts[-1]
        stem, dot, ext = last.rpartition(".")
        if dot and stem and f".{ext}" in PHOTO_NAME_EXTENSIONS:
            last = stem
        elif integral := INTEGRAL_RE.fullmatch(last):  # SKU typed as a number: "13734.0"
            last = integral.group(1)
        parts[-1] = last
    return parts


def normalise_name(ref: str) -> str:
    """The key that ties a sheet's photo reference to an uploaded file.

    Last component of a path or URL (query/fragment dropped, %-escapes decoded, "\\" treated
    as "/"), Unicode NFC, case-folded, image extension dropped: "Photos\\IMG_001.JPG",
    "img_001.jpeg" and "https://cdn.x.com/a/img_001.jpg?w=200" all give "img_001".
    """
    parts = _ref_parts(ref)
    return parts[-1] if parts else ""


@dataclass
class MatchResult:
    """Labels tied to uploaded photos, plus everything in the sheet that could not be used.

    ``rows_matched`` counts sheet rows whose photo was found among the uploads;
    ``rows_unmatched`` the other rows (photo not uploaded, ambiguous name or no photo name),
    so the two add up to ``rows_total``. ``images_unlabelled`` lists uploaded photos that got
    no label (no row, an empty label or conflicting rows).
    """

    labels: dict[str, str]
    problems: list[Problem] = field(default_factory=list)
    rows_total: int = 0
    rows_matched: int = 0
    rows_unmatched: int = 0
    images_unlabelled: list[str] = field(default_factory=list)


def match_labels(
    sheet: Sheet,
    *,
    image_column: str,
    label_column: str,
    image_names: Iterable[str],
    on_problem: Callable[[Problem], None] | None = None,
) -> MatchResult:
    """Give each uploaded photo its label from the sheet, and report every row that can't.

    Matching ignores case, image extension, folders and URL parts; when two uploaded photos
    share a name in different folders, the row must name the folder too. Duplicated rows are
    counted once; contradicting rows leave the photo unlabelled. Labels differing only in
    capitals/spaces are merged into their most common spelling; ``NaN``, ``N/A``, ``-`` are
    no labels. The problems keep the first :data:`ROWS_SHOWN` rows of each kind and one
    line counting the rest, so a million-row sheet stays readable; ``on_problem`` sees every
    one of them (the full list, for a download). The sheet's own notes (character set,
    worksheet, formulas) come first.
    """
    for column in (image_column, label_column):
        if column not in sheet.frame.columns:
            available = ", ".join(f"'{c}'" for c in sheet.frame.columns)
            raise InputError(f"'{sheet.filename}' has no column named '{column}'. Its columns are: {available}.")
    if image_column == label_column:
        raise InputError(
            f"The photo names and the labels must come from two different columns of "
            f"'{sheet.filename}', but both are set to '{image_column}'."
        )

    uploads = list(dict.fromkeys(image_names))
    by_path: dict[tuple[str, ...], list[str]] = defaultdict(list)
    by_base: dict[str, list[str]] = defaultdict(list)
    upload_parts: dict[str, list[str]] = {}
    for name in uploads:
        parts = _ref_parts(name)
        if not parts:
            continue
        upload_parts[name] = parts
        by_path[tuple(parts)].append(name)
        by_base[parts[-1]].append(name)

    file = sheet.filename
    problems: list[Problem] = list(sheet.notes)
    refs = sheet.frame[image_column].tolist()
    written = sheet.frame[label_column].tolist()
    raw_labels = [_clean_label(v) for v in written]
    rows = [sheet.sheet_row(i) for i in sheet.frame.index]
    labels, merge_note = _merge_label_spellings(raw_labels, file=file)
    per_kind: Counter[str] = Counter()

    def add(problem: Problem) -> None:
        if on_problem is not None:
            on_problem(problem)
        per_kind[problem.kind] += 1
        if per_kind[problem.kind] <= ROWS_SHOWN:
            problems.append(problem)

    def warn(kind: str, row: int, message: str) -> None:
        add(Problem(kind, message, file=file, row=row, severity="warning"))

    claims: dict[str, list[tuple[int, str]]] = defaultdict(list)
    matched = 0
    for ref, label, row, cell in zip(refs, labels, rows, written, strict=True):
        if not ref:
            what = f"a label ('{label}')" if label else "other content"
            warn(
                "empty_image_name",
                row,
                f"Row {row} has {what} but no photo name in column '{image_column}', so it was skipped. "
                "Fill in the photo's file name or delete the row.",
            )
            continue
        candidates = _candidates(_ref_parts(ref), by_path, by_base, upload_parts)
        if len(candidates) > 1:
            listed = ", ".join(f"'{c}'" for c in candidates)
            warn(
                "ambiguous_name",
                row,
                f"Row {row}: '{ref}' could be any of these uploaded photos: {listed}. None of them got this "
                f"row's label. Write the folder too (for example '{candidates[0]}') so it is clear which "
                "photo is meant.",
            )
        elif not candidates:
            warn(
                "missing_photo",
                row,
                f"Row {row}: photo '{ref}' is in the sheet but was not among the uploaded photos. Upload it "
                "too if you want it used, or ignore this message.",
            )
        elif not label:
            matched += 1
            has = f"'{cell.strip()}', which is not a label," if cell.strip() else "no label"
            warn(
                "empty_label",
                row,
                f"Row {row} (photo '{ref}') has {has} in column '{label_column}'. Fill it in, or the "
                "photo stays unlabelled.",
            )
        else:
            matched += 1
            claims[candidates[0]].append((row, label))

    result: dict[str, str] = {}
    for image, claimed in claims.items():
        distinct = list(dict.fromkeys(label for _, label in claimed))
        if len(distinct) == 1:
            result[image] = distinct[0]
            for row, label in claimed[1:]:
                warn(
                    "duplicate_row",
                    row,
                    f"Row {row} repeats row {claimed[0][0]} (photo '{image}', label '{label}'); it was counted once.",
                )
            continue
        rows_text = _join_rows([row for row, _ in claimed])
        each = ", ".join(f"'{label}' in row {row}" for row, label in claimed)
        add(
            Problem(
                "conflicting_labels",
                f"Photo '{image}' has different labels in {rows_text} ({each}). It was left "
                "unlabelled: keep only the correct row in your sheet, then upload it again.",
                file=file,
                row=claimed[0][0],
                severity="error",
            )
        )

    for kind, count in per_kind.items():
        if count > ROWS_SHOWN:
            problems.append(Problem(
                kind, f"... and {count - ROWS_SHOWN:,} more rows of '{file}' like the {ROWS_SHOWN} above "
                f"({count:,} in all). Download the full problem list to see every row.",
                file=file, severity="warning"))
    if merge_note is not None:
        problems.append(merge_note)
    examples = ", ".join(f"'{r}'" for r in [r for r in refs if r][:3])
    if examples and matched == 0 and uploads:
        problems.append(
            Problem(
                "no_matches",
                f"None of the photo names in column '{image_column}' of '{file}' (for example "
                f"{examples}) matches an uploaded photo (for example '{uploads[0]}'). Check that "
                "the right column is chosen for photo names and that you uploaded the right photos.",
                file=file,
                severity="error",
            )
        )
    problems.sort(key=lambda p: (p.row is None, p.row or 0))
    return MatchResult(
        labels=result,
        problems=problems,
        rows_total=len(refs),
        rows_matched=matched,
        rows_unmatched=len(refs) - matched,
        images_unlabelled=[name for name in uploads if name not in result],
    )


ROWS_SHOWN = 20  # problems of one kind listed one by one; the rest are counted
NOT_LABELS = frozenset({"nan", "n/a", "#n/a", "-", "\u2013", "\u2014"})  # what spreadsheets write for "no value"


def _candidates(
    parts: list[str],
    by_path: Mapping[tuple[str, ...], list[str]],
    by_base: Mapping[str, list[str]],
    upload_parts: Mapping[str, list[str]],
) -> list[str]:
    """Uploaded photos a reference may mean: exact path first, then the longest folder match."""
    if not parts:
        return []
    exact = by_path.get(tuple(parts))
    if exact:
        return exact
    same_base = by_base.get(parts[-1], [])
    if len(same_base) <= 1:
        return list(same_base)

    def shared_tail(name: str) -> int:
        n = 0
        for a, b in zip(reversed(parts), reversed(upload_parts[name]), strict=False):
            if a != b:
                break
            n += 1
        return n

    tails = {name: shared_tail(name) for name in same_base}
    longest = max(tails.values())
    best = [name for name, n in tails.items() if n == longest]
    return best if longest > 1 else list(same_base)


def _clean_label(value: str) -> str:
    value = value.strip()
    if value.casefold() in NOT_LABELS:
        return ""
    integral = INTEGRAL_RE.fullmatch(value)
    return str(int(integral.group(1))) if integral else value


def _merge_label_spellings(labels: list[str], *, file: str) -> tuple[list[str], Problem | None]:
    """Map labels differing only in capitals/spaces to their most common spelling."""
    counts = Counter(label for label in labels if label)
    groups: dict[str, list[str]] = defaultdict(list)
    for spelling in counts:  # Counter keeps first-seen order
        groups[" ".join(spelling.split()).casefold()].append(spelling)
    mapping: dict[str, str] = {}
    merged = []
    for spellings in groups.values():
        if len(spellings) < 2:
            continue
        winner = max(spellings, key=lambda s: counts[s])  # max keeps the first on ties
        for spelling in spellings:
            mapping[spelling] = winner
        listed = " and ".join(f"'{s}'" for s in spellings)
        merged.append(f"{listed} as '{winner}'")
    if not merged:
        return labels, None
    note = Problem(
        "labels_merged",
        "Some labels differ only in capital letters or spaces and were treated as the same "
        f"label: {'; '.join(merged)}. If they really are different, rename one of them in "
        "the sheet.",
        file=file,
        severity="info",
    )
    return [mapping.get(label, label) for label in labels], note


def _join_rows(rows: list[int]) -> str:
    rows = sorted(set(rows))
    if len(rows) == 1:
        return f"row {rows[0]}"
    return "rows " + ", ".join(map(str, rows[:-1])) + f" and {rows[-1]}"


# --------------------------------------------------------------------------- training checks


MIN_PER_CLASS = 3  # one photo each for testing, validation and training
SMALL_CLASS = 10


def training_blockers(labels: Mapping[str, str], *, min_per_class: int = MIN_PER_CLASS) -> list[Problem]:
    """What stops (errors) or weakens (warnings) training on these photo labels.

    Checks that there are at least two labels, that each has ``min_per_class`` photos (the
    honest split needs one to test, one to validate and one to learn from), warns under
    ``SMALL_CLASS`` photos and under 10 % of the photos, so the analyst can fix it before
    waiting on a run.
    """
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be at least 1, got {min_per_class}")
    counts = Counter(labels.values())
    total = sum(counts.values())
    if total == 0:
        return [
            Problem(
                "no_labels",
                "No photo has a label yet. Upload a label sheet that matches your photos, or "
                "label some photos, before training.",
            )
        ]
    problems: list[Problem] = []
    if len(counts) < 2:
        ((only, _),) = counts.items()
        everything = f"All {total} labelled photos are" if total > 1 else "The only labelled photo is"
        problems.append(
            Problem(
                "single_class",
                f"{everything} '{only}'. The model needs at least two kinds of photo to learn the "
                f"difference: add photos with another label (for example photos that are not "
                f"'{only}').",
            )
        )
    for name, count in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])):
        share = count / total
        if count < min_per_class:
            photos = "photo is" if count == 1 else "photos are"
            problems.append(
                Problem(
                    "too_few_examples",
                    f"Only {count} {photos} labelled '{name}'. Each label needs at least "
                    f"{min_per_class} photos: label {min_per_class - count} more as '{name}', or "
                    "remove this label from the sheet.",
                )
            )
            continue
        if count < SMALL_CLASS:
            problems.append(
                Problem(
                    "small_class",
                    f"Only {count} photos are labelled '{name}'. Training works, but with fewer than "
                    f"{SMALL_CLASS} photos per label the results are shaky: label a few more if you can.",
                    severity="warning",
                )
            )
        if len(counts) >= 2 and share < 0.10:
            problems.append(
                Problem(
                    "class_imbalance",
                    f"Only {count} of {total} labelled photos ({share:.0%}) are '{name}'. The model "
                    f"may rarely predict '{name}'; add more '{name}' photos if you can.",
                    severity="warning",
                )
            )
    return problems


def class_display_defaults(classes: Iterable[str]) -> dict[str, str]:
    """Default display name for each label: the label itself, until the analyst renames it."""
    return {c: c for c in classes}
