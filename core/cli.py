"""The command line: the same work as the app, for scheduled jobs and big catalogs.

    python -m core projects                      list projects
    python -m core create NAME                   create a project
    python -m core intake --project P --images DIR_OR_ZIP... [--labels SHEET]
    python -m core job-run --project P --job ID  (used by the app to run background jobs)

Every command exits non-zero with a plain message on bad input; ``--json`` prints a
machine-readable result for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core import workspace
from core.problems import InputError


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def cmd_projects(args: argparse.Namespace) -> int:
    rows = [{"slug": p.slug, "name": p.name} for p in workspace.list_projects()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['slug']}\t{row['name']}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    project = workspace.create_project(args.name)
    _print({"slug": project.slug, "name": project.name, "path": str(project.root)}, args.json)
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    from core import intake

    project = workspace.open_project(args.project)
    for source in args.images or []:
        source = Path(source)
        if not source.exists():
            raise InputError(f"{source} does not exist.")
        if source.is_dir():
            # A folder is read in place (never moved or deleted), keeping relative names.
            intake.stage_folder(project, source)
        else:
            with open(source, "rb") as fh:
                intake.stage_upload(project, filename=source.name, data=fh)
    summary = intake.process_staged(
        project, on_progress=None if args.json else _progress_printer("Checking photos")
    )
    result = summary.to_dict()
    if args.labels:
        sheet = Path(args.labels)
        match = intake.apply_sheet(
            project, filename=sheet.name, data=sheet.read_bytes(),
            image_column=args.image_column, label_column=args.label_column,
        )
        if match is not None:
            result.update(rows_total=match.rows_total, rows_matched=match.rows_matched)
    training = project.training_set()
    result["labelled_photos"] = len(training)
    result["classes"] = training["label"].value_counts().to_dict()
    result.pop("per_upload", None)
    _print(result, args.json)
    return 0


def _progress_printer(label: str):
    def show(done: int, total: int, message: str | None = None) -> None:
        end = "\n" if done >= total else "\r"
        print(f"{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def cmd_job_run(args: argparse.Namespace) -> int:
    from core import jobs

    project = workspace.open_project(args.project)
    job = jobs.run(project, args.job)
    return 0 if job.status in ("done", "cancelled") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Catalog Lens command line")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("projects", help="list projects")
    p.set_defaults(func=cmd_projects)

    p = sub.add_parser("create", help="create a project")
    p.add_argument("name")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("intake", help="add photos (files, folders, zips) and a label sheet")
    p.add_argument("--project", required=True)
    p.add_argument("--images", nargs="*", help="photo files, folders or zip archives")
    p.add_argument("--labels", help="label sheet (CSV, TSV, Excel)")
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.set_defaults(func=cmd_intake)

    p = sub.add_parser("job-run", help=argparse.SUPPRESS)
    p.add_argument("--project", required=True)
    p.add_argument("--job", required=True)
    p.set_defaults(func=cmd_job_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
