"""Commands about projects and their data: projects, create, intake, backbones, weights,
extract, bench, report, demo, and job-run (what the app's background jobs run)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from core import bench, demo, tasks
from core.base.problems import InputError, where
from core.cli.common import find_project, print_result, progress_printer
from core.inputs import labels
from core.present import report_html
from core.projects import intake, workspace
from core.projects.state import ProjectState
from core.vision import backbones, weights


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
    print_result({"slug": project.slug, "name": project.name, "path": str(project.root)}, args.json)
    return 0


def cmd_intake(args: argparse.Namespace) -> int:
    if args.labels:  # an unusable sheet stops everything before any photo is touched
        sheet_path = Path(args.labels)
        if not sheet_path.is_file():
            raise InputError(f"The label sheet {args.labels} does not exist.")
        labels.read_sheet(sheet_path.read_bytes(), filename=sheet_path.name)
    if args.project:
        project = find_project(args.project) or workspace.create_project(args.project)
    else:
        first = Path(args.images[0]) if args.images else Path(args.labels or "photos")
        name = first.stem or "Photos"
        project = find_project(name) or workspace.create_project(name)
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
    checked = intake.process_staged(project, on_progress=None if args.json else progress_printer("Checking photos"))
    if args.labels:
        sheet = Path(args.labels)
        intake.apply_sheet(project, filename=sheet.name, data=sheet.read_bytes(),
                           image_column=args.file_column, label_column=args.label_column)
    summary = intake.data_summary(project)
    problems = project.problems()
    match = summary["match"] or {}
    result = {
        "project": project.slug,
        "files_checked": checked.files_seen,
        "photos": summary["photos"],
        "unique_photos": summary["unique_photos"],
        "matched": int(match.get("rows_matched", 0)),
        "per_class": summary["classes"],
        "unlabeled_images": summary["unlabelled"],
        "missing_images": int((problems["kind"] == "missing_photo").sum()),
        "problems": [
            {"item": where(r.file, r.row) or r.scope,
             "reason": r.message, "severity": r.severity}
            for r in problems.itertuples()
        ],
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for key in ("project", "photos", "matched", "per_class", "unlabeled_images", "missing_images"):
            print(f"{key}: {result[key]}")
        for p in result["problems"]:
            print(f"  [{p['severity']}] {p['item'].strip()}: {p['reason']}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    rows = []
    for b in backbones.list_backbones():
        status = weights.weights_status(b)
        rows.append({"id": b.id, "name": b.name, "feature_dim": b.feature_dim,
                     "imagenet_top1": b.imagenet_top1, "available": status.available,
                     "download_mb": status.size_mb, "good_for": b.good_for})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            ready = "ready" if r["available"] else f"needs {r['download_mb']:.0f} MB download"
            print(f"{r['id']:<22} {r['imagenet_top1']:>5.1f}%  {ready:<24} {r['good_for']}")
    return 0


def cmd_weights_import(args: argparse.Namespace) -> int:
    try:
        path = weights.import_weights(args.backbone, Path(args.file))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    print_result({"backbone": args.backbone, "stored": str(path)}, args.json)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    project = workspace.open_project(args.project)
    backbone_id = args.backbone or ProjectState(project).backbone or backbones.DEFAULT_BACKBONE_ID
    # A job like the Backbone page's: a second identical command (or the page) waits for this one.
    job = tasks.run_here(project, "extract", {"backbone": backbone_id, "device": args.device},
                         on_progress=None if args.json else lambda d, t, m: progress_printer(m or "")(d, t))
    if job.status != "done":
        raise InputError(job.error or f"The extraction was {job.status}.")
    print_result(job.result or {}, args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:

    folder = Path(args.images)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of photos.")
    with tempfile.TemporaryDirectory() as tmp:
        if args.upscale:
            folder = bench.upscale_folder(folder, Path(tmp) / "large", size=args.upscale, limit=args.limit)
        result = bench.bench_extract(folder, backbone_id=args.backbone, device=args.device, repeats=args.repeats,
                                     runs=args.runs, busy=args.busy)
    if args.upscale:
        result["upscaled_to_px"] = args.upscale
    runs = result.pop("runs", []) if not args.json else []
    print_result(result, args.json)
    for i, run in enumerate(runs, 1):
        print(f"run {i} (fresh cache): batch {run['batch_size']}, {'channels-last' if run['channels_last'] else 'plain'}"
              f", {run['workers']} workers, chosen in {run['chooser_s']} s; forward {run['forward_img_s']}, pipeline "
              f"{run['pipeline_img_s']}, notebook {run['naive_img_s']} photos/s; pipeline/forward "
              f"{run['pipeline_vs_forward']}, pipeline/notebook {run['pipeline_vs_naive']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    project = find_project(args.project)
    if project is None:
        raise InputError(f"No project named {args.project!r}. Projects: "
                         f"{', '.join(p.name for p in workspace.list_projects()) or 'none yet'}.")
    out = report_html.write_html(project, Path(args.out), question=args.question)
    print_result({"project": project.slug, "report": str(out), "bytes": out.stat().st_size}, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    names = {}
    for item in args.class_name or []:
        label, sep, display = item.partition("=")
        if not sep or not label.strip() or not display.strip():
            raise InputError(f"--class-name takes LABEL=NAME (e.g. person=\"Person in photo\"), not {item!r}.")
        names[label.strip()] = display.strip()
    summary = demo.build_demo(
        Path(args.images), Path(args.labels), name=args.project, replace=args.replace, class_names=names,
        catalog=Path(args.catalog) if args.catalog else None,
        catalog_images=Path(args.catalog_images) if args.catalog_images else None,
        epochs=args.epochs, say=(lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True)),
    )
    print_result(summary.to_dict(), args.json)
    if not args.json:
        print(f"Open it with: streamlit run app.py, then choose the project {args.project!r}.")
    return 0


def cmd_job_run(args: argparse.Namespace) -> int:
    project = workspace.open_project(args.project)
    job = tasks.run(project, args.job)
    return 0 if job.status in ("done", "cancelled") else 1
