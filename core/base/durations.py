"""How a length of time is written for people: the one owner of "28 s", "5 min 49 s", "1 h 5 min"."""

from __future__ import annotations

__all__ = ["duration_text"]


def duration_text(seconds: float, *, rough: bool = False) -> str:
    """``seconds`` in plain words, rounded to what matters: "under 1 s", "28 s", "5 min 49 s", "1 h 5 min".

    ``rough`` is for estimates: whole minutes from a minute and a half on, 5 s steps below.
    """
    s = max(0.0, float(seconds))
    if rough:
        s = round(s / 60) * 60 if s >= 90 else max(5, round(s / 5) * 5)
    if s < 1:
        return "under 1 s"
    if s < 60:
        return f"{s:.0f} s"
    total = round(s)
    if total < 3600:
        m, sec = divmod(total, 60)
        return f"{m} min" + (f" {sec} s" if sec and m < 10 else "")
    h, m = divmod(round(total / 60), 60)
    return f"{h} h" + (f" {m} min" if m else "")
