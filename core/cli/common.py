"""What every command shares: printing results, progress lines, finding a project."""

from __future__ import annotations

import json
import sys

from core.projects import workspace


def print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def progress_printer(label: str):
    def show(done: int, total: int, message: str | None = None) -> None:
        end = "\n" if done >= total else "\r"
        print(f"{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def find_project(name: str) -> workspace.Project | None:
    """An existing project named by its slug or its display name, else None."""
    for info in workspace.list_projects():
        if name in (info.slug, info.name):
            return workspace.open_project(info.slug)
    return None
