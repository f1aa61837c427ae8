"""Problems found in user input, written for a marketing analyst.

Every part of the intake (images, zips, label sheets, catalogs) reports what it could not
use as a :class:`Problem` instead of raising, so that one bad file never stops the rest of
the work. A problem names the file and/or sheet row, says what is wrong in plain words and,
where possible, what to do about it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Problem:
    """One thing in the user's input that could not be used as it is.

    ``kind`` is a short machine-readable code (``"corrupt_image"``, ``"duplicate_row"``...),
    ``message`` the sentence shown to the analyst. ``row`` is the row number as the analyst
    sees it in their spreadsheet program (header = row 1), not a 0-based index.
    """

    kind: str
    message: str
    file: str | None = None
    row: int | None = None
    severity: Severity = "error"

    def to_dict(self) -> dict:
        return asdict(self)


def where(file: object = None, row: object = None) -> str:
    """A problem's place in words ("row 7 photo.jpg"), for lists read back from storage where a
    blank file or row comes as None, NaN or ""; "" when neither is known."""
    parts = []
    if isinstance(row, (int, float)) and row == row:  # NaN != NaN
        parts.append(f"row {int(row)}")
    if isinstance(file, str) and file.strip():
        parts.append(file)
    return " ".join(parts)


class InputError(ValueError):
    """User input that cannot be used at all; ``str()`` is a plain sentence for the UI."""
