"""Measured quality and speed of the offline networks, for the Backbone page.

``benchmarks/bench_backbones.py --write`` measures each network that works offline on
person-presence (everyday photos, catalog photos, flat-lay photos that show no one) and
stores the figures in ``backbone_figures.json`` next to this module with
:func:`save_figures`; :func:`measured_figures` reads them back and :func:`figures_table`
puts them in plain words. The figures are data, never retyped in a page.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from core.base.files import atomic_write_text
from core.vision.backbones import get_backbone

__all__ = [
    "FIGURES_PATH",
    "figures_note",
    "figures_table",
    "headline_variant",
    "measured_figures",
    "save_figures",
]

FIGURES_PATH = Path(__file__).with_name("backbone_figures.json")

_VERSION = 1

# What the variant names of the benchmark mean, in plain words (for the page's notes).
VARIANT_WORDS = {
    "squash": "whole photo resized to a square",
    "center": "centre square only (edges cut off)",
    "letterbox": "whole photo, grey bars to make it square",
    "native": "whole photo, shape kept",
    "flip": "photo and its mirror image",
    "large": "whole photo at 1.5 times the size",
    "multiscale": "whole photo at two sizes",
    "squash avg+max": "strongest spot counted as well as the average",
    "squash avg+mid": "an earlier layer of the network added",
    "multiscale+flip": "two sizes and the mirror image",
}


def headline_variant(backbone_id: str) -> str:
    """The benchmark variant that matches how the app prepares photos for this network."""
    return {"squash": "squash", "center": "center"}.get(get_backbone(backbone_id).preprocessing.crop_mode, "squash")


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else float(v)) for k, v in d.items() if k in ("mean", "low", "high", "test")}


def save_figures(
    rows: Sequence[Mapping[str, Any]],
    speeds: Mapping[str, float],
    *,
    machine: str,
    path: Path = FIGURES_PATH,
) -> Path:
    """Store the benchmark's rows (one per network and variant) and photos/s per network."""
    data = {
        "version": _VERSION,
        "measured_on": dt.date.today().isoformat(),
        "machine": machine,
        "data": {
            "everyday": "300 everyday photos (39 with a person; ImageNet validation sample)",
            "catalog": "480 studio catalog photos (248 with a person)",
            "flatlay": "300 phone photos of garments laid flat, no person (never trained on)",
        },
        "method": "the Train step's frozen model: 5x repeated 5-fold cross-validation on 80 % of "
        "the photos; balanced accuracy with its 95 % range",
        "photos_per_s": {k: round(float(v), 1) for k, v in speeds.items()},
        "rows": [
            {
                "backbone": r["backbone"],
                "variant": r["variant"],
                "everyday": _clean(r["everyday"]),
                "catalog": _clean(r["catalog"]),
                "flatlay_person": int(r["flatlay_person"]),
                "flatlay_n": int(r["flatlay_n"]),
                "relative_time": round(float(r["relative_time"]), 2),
            }
            for r in rows
        ],
    }
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    measured_figures.cache_clear()
    return path


@cache
def measured_figures(path: Path = FIGURES_PATH) -> dict[str, Any] | None:
    """The stored figures, or None when none were measured (or the file is unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == _VERSION else None


def _pc(v: float) -> str:
    # One decimal near 100 %, rounded down, so 99.6 % never reads as 100 %.
    return f"{math.floor(1000 * v) / 10:.1f} %" if 0.99 < v < 1 else f"{100 * v:.0f} %"


def _share(d: Mapping[str, Any]) -> str:
    if d.get("low") is None:
        return _pc(d["mean"])
    return f"{_pc(d['mean'])} (95 % range {_pc(d['low'])[:-2]} to {_pc(d['high'])})"


def figures_table(path: Path = FIGURES_PATH) -> pd.DataFrame | None:
    """One row per measured network, in plain words, as the app prepares its photos;
    None when nothing was measured."""
    data = measured_figures(path)
    if not data:
        return None
    rows = []
    for r in data["rows"]:
        try:
            backbone = get_backbone(r["backbone"])
        except ValueError:  # measured once, no longer offered
            continue
        if r["variant"] != headline_variant(backbone.id):
            continue
        speed = data["photos_per_s"].get(backbone.id)
        rows.append(
            {
                "Network": backbone.name,
                "Everyday photos (balanced accuracy)": _share(r["everyday"]),
                "Catalog photos (balanced accuracy)": _share(r["catalog"]),
                "Flat-lay photos wrongly called 'person'": f"{r['flatlay_person']} of {r['flatlay_n']}",
                "Speed measured": f"{speed:.0f} photos/s" if speed else "not measured",
            }
        )
    return pd.DataFrame(rows) if rows else None


def figures_note(path: Path = FIGURES_PATH) -> str | None:
    """Where and how :func:`figures_table`'s figures were measured, in one paragraph."""
    data = measured_figures(path)
    if not data:
        return None
    d = data["data"]
    return (
        f"Measured on {data['measured_on']} on {data['machine']}, with the Train step's quick model "
        f"telling photos with a person from photos without: {d['everyday']}; {d['catalog']}; "
        f"{d['flatlay']}, checked with the model trained on the catalog photos. Balanced accuracy is "
        "the average of the share of photos with a person found and the share of photos without one "
        "kept; the range is where the true figure lies with 95 % confidence. Speed is the whole job "
        "(reading the photos included) on that computer; yours will differ."
    )
