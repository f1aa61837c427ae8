"""The command line: the same work as the app, for scheduled jobs and big catalogs.

    python -m core projects                      list projects
    python -m core create NAME                   create a project
    python -m core intake --images DIR_OR_ZIP... --labels SHEET [--project NAME] --json
    python -m core backbones                     list the pretrained networks
    python -m core weights import --backbone ID --file FILE
    python -m core extract --project P [--backbone ID] [--device cuda]
    python -m core train --images DIR --labels SHEET --method frozen|finetune --out BUNDLE
    python -m core predict --model BUNDLE --images DIR
    python -m core bench extract --images DIR [--upscale 2000]
    python -m core tag --model BUNDLE --catalog FILE [--images DIR|ZIP] --out FILE [--resume]
    python -m core report --project P --out FILE.html
    python -m core demo --images DIR --labels SHEET [--project NAME] [--catalog FILE]
    python -m core job-run --project P --job ID  (used by the app to run background jobs)

Every command exits non-zero with a plain message on bad input; ``--json`` prints a
machine-readable result for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from core import bench, demo, tagging, tasks
from core.base.files import atomic_copy
from core.base.problems import InputError
from core.inputs import labels
from core.inputs.images import looks_like_image_name
from core.learning import bundles, extraction, finetune_config, models, predictor, training
from core.present import report
from core.projects import intake, workspace
from core.projects.state import ProjectState
from core.vision import backbones, weights


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
    if args.labels:  # an unusable sheet stops everything before any photo is touched
        sheet_path = Path(args.labels)
        if not sheet_path.is_file():
            raise InputError(f"The label sheet {args.labels} does not exist.")
        labels.read_sheet(sheet_path.read_bytes(), filename=sheet_path.name)
    if args.project:
        project = _find_project(args.project) or workspace.create_project(args.project)
    else:
        first = Path(args.images[0]) if args.images else Path(args.labels or "photos")
        name = first.stem or "Photos"
        project = _find_project(name) or workspace.create_project(name)
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
    checked = intake.process_staged(project, on_progress=None if args.json else _progress_printer("Checking photos"))
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
            {"item": " ".join(x for x in (f"row {int(r.row)}" if r.row == r.row and r.row is not None else "",
                                          r.file or "") if x) or r.scope,
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


def _progress_printer(label: str):
    def show(done: int, total: int, message: str | None = None) -> None:
        end = "\n" if done >= total else "\r"
        print(f"{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


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
    _print({"backbone": args.backbone, "stored": str(path)}, args.json)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    project = workspace.open_project(args.project)
    backbone_id = args.backbone or ProjectState(project).backbone or backbones.DEFAULT_BACKBONE_ID
    try:
        summary = extraction.extract_project(
            project, backbone_id, device=args.device,
            on_progress=None if args.json else lambda d, t, m: _progress_printer(m)(d, t),
        )
    except weights.WeightsUnavailable as exc:
        raise InputError(str(exc)) from exc
    _print(summary, args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:

    folder = Path(args.images)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of photos.")
    with tempfile.TemporaryDirectory() as tmp:
        if args.upscale:
            folder = bench.upscale_folder(folder, Path(tmp) / "large", size=args.upscale, limit=args.limit)
        result = bench.bench_extract(folder, backbone_id=args.backbone, device=args.device, repeats=args.repeats)
    if args.upscale:
        result["upscaled_to_px"] = args.upscale
    _print(result, args.json)
    return 0


def _tagging_model(args: argparse.Namespace) -> tuple[Path, float | None, workspace.Project | None]:
    """The model file, its threshold and the project (if any) a ``tag`` command uses:
    ``--model FILE`` with its own threshold, or ``--project P`` with the model and threshold
    chosen in that project; ``--threshold`` replaces either."""
    if args.project:
        project = _find_project(args.project)
        if project is None:
            raise InputError(f"No project named {args.project!r}. Projects: "
                             f"{', '.join(p.name for p in workspace.list_projects()) or 'none yet'}.")
        model = models.tagging_model(project)
        if model is None:
            raise InputError(f"The project {project.name!r} has no model yet: train one first.")
        chosen = model["threshold"] if model["positive"] else None
        return Path(model["path"]), args.threshold if args.threshold is not None else chosen, project
    return Path(args.model), args.threshold, None


def cmd_tag(args: argparse.Namespace) -> int:
    catalog = Path(args.catalog)
    if not catalog.is_file():
        raise InputError(f"The catalog {catalog} does not exist.")
    images = Path(args.images) if args.images else None
    if images is not None and not images.exists():
        raise InputError(f"{images} does not exist.")
    bundle_path, threshold, project = _tagging_model(args)
    out = Path(args.out)
    folder = out.with_name(out.name + ".run")  # the checkpoint, beside the output
    if folder.exists() and not args.resume:
        shutil.rmtree(folder)
    if (folder / "run.json").is_file():
        changed = tagging.resume_conflict(folder, catalog_path=catalog, bundle_path=bundle_path)
        if changed:
            run = tagging.load_run(folder)
            raise InputError(
                f"{out.name} belongs to a run of {run['catalog_name']} with the model {Path(run['bundle']).name} "
                f"(id {run['model_id']}), and {changed} given now is a different one: use another --out to tag "
                f"{catalog.name} with {bundle_path.name}, or drop --resume to start over.")
    else:  # photo columns not named, and the product id column, are guessed from the catalog
        options = tagging.TagOptions(image_columns=args.image_column or [], rule=args.rule,
                                     review_below=args.review_below, chunk_rows=args.chunk_rows)
        is_zip = images is not None and images.is_file()
        tagging.create_run(folder, catalog_path=catalog, bundle_path=bundle_path, options=options,
                           images_zip=images if is_zip else None, images_dir=images if images and not is_zip else None,
                           threshold=threshold)
    summary = tagging.run_tagging(
        folder, device=args.device,
        project_files=tagging.project_photo_files(project) if project else None,
        feature_store=extraction.feature_store(project) if project else None,
        on_progress=None if args.json else lambda d, t, m: _progress_printer(m)(d, t))
    tagging.write_output(folder, out)
    result = {**summary.to_dict(), "out": str(out), "checkpoint": str(folder), "model_id": tagging.load_run(folder)["model_id"],
              "threshold": tagging.load_run(folder).get("threshold")}
    _print(result, args.json)
    return 0


def cmd_job_run(args: argparse.Namespace) -> int:
    project = workspace.open_project(args.project)
    job = tasks.run(project, args.job)
    return 0 if job.status in ("done", "cancelled") else 1


def _find_project(name: str) -> workspace.Project | None:
    """An existing project named by its slug or its display name, else None."""
    for info in workspace.list_projects():
        if name in (info.slug, info.name):
            return workspace.open_project(info.slug)
    return None


def _train_bundle(project: workspace.Project, args: argparse.Namespace, backbone_id: str, show):
    """Intake, features and training for ``cmd_train``; returns the run record."""

    intake.stage_folder(project, Path(args.images))
    intake.process_staged(project, on_progress=show("Checking photos"))
    sheet = Path(args.labels)
    match = intake.apply_sheet(
        project, filename=sheet.name, data=sheet.read_bytes(),
        image_column=args.file_column, label_column=args.label_column,
    )
    if match is None:
        columns = ", ".join(intake.sheet_state(project).columns)
        raise InputError(
            f"Could not tell which column of {sheet.name} holds the photo file names and which holds the "
            f"labels. Name them with --file-column and --label-column (its columns: {columns})."
        )
    blockers = [p.message for p in intake.refresh_blockers(project) if p.severity == "error"]
    if not len(project.training_set()):
        blockers = [f"No photo in {args.images} matches a row of {sheet.name} "
                    f"({match.rows_total} rows, {match.rows_matched} matched). Check the file-name column."]
    if blockers:
        raise InputError(" ".join(blockers))
    try:
        extraction.extract_project(project, backbone_id, device=args.device,
                                   on_progress=lambda d, t, m: show(m)(d, t))
    except weights.WeightsUnavailable as exc:
        raise InputError(str(exc)) from exc
    if args.method == "frozen":
        return training.train_frozen(project, backbone_id=backbone_id, on_progress=lambda d, t, m: show(m)(d, t))
    config = finetune_config.FinetuneConfig(seed=0, **({"epochs": args.epochs} if args.epochs else {}))
    return training.train_finetuned(project, backbone_id=backbone_id, config=config, device=args.device,
                                    on_progress=lambda d, t, m: show(m)(d, t))


def _metrics(record) -> dict:
    """Held-out scores of a run: the same test photos for both methods."""
    test = record.test_report
    ba = test["balanced_accuracy"]
    metrics = {
        "balanced_accuracy": ba["value"], "low": ba["low"], "high": ba["high"],
        "accuracy": test["accuracy"]["value"], "macro_f1": test["macro_f1"]["value"],
        "n_test": test["n"], "positive": record.positive, "threshold": record.threshold,
        "headline": record.headline, "warnings": test.get("warnings", []),
    }
    cv = (record.extra.get("cv") or {}).get("summary") or {}
    if cv.get("balanced_accuracy"):
        metrics["cross_validation"] = cv["balanced_accuracy"]
    return metrics


def cmd_train(args: argparse.Namespace) -> int:

    started = time.time()
    if not Path(args.images).is_dir():
        raise InputError(f"{args.images} is not a folder of photos.")
    if not Path(args.labels).is_file():
        raise InputError(f"The label sheet {args.labels} does not exist.")
    backbone_id = args.backbone or backbones.DEFAULT_BACKBONE_ID
    try:
        backbones.get_backbone(backbone_id)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if args.epochs is not None and (args.method != "finetune" or args.epochs < 1):
        raise InputError("--epochs needs --method finetune and a number of at least 1.")
    out = Path(args.out)
    if out.suffix.lower() != ".zip" and not out.is_dir():
        raise InputError(f"--out should name a .zip file (or an existing folder), got {out}.")

    def show(label: str):
        return (lambda *done_total_message: None) if args.json else _progress_printer(label)

    project = _find_project(args.project) if args.project else None
    throwaway = not args.project
    if project is None:
        project = workspace.create_project(args.project or f"Command-line training {time.strftime('%Y-%m-%d %H%M%S')}")
    try:
        record = _train_bundle(project, args, backbone_id, show)
        if out.is_dir():
            out = out / f"catalog-lens-model-{record.id}.zip"
        atomic_copy(Path(record.bundle_path), out)
        bundle, _ = bundles.load_bundle(out)
    finally:
        if throwaway:
            workspace.delete_project(project.slug)
    result = {
        "method": args.method, "backbone": backbone_id, "metrics": _metrics(record),
        "bundle": str(out.resolve()), "n_photos": len(bundle.split.get("ids", [])),
        "classes": list(bundle.classes), "seconds": round(time.time() - started, 1),
    }
    if not throwaway:
        result["project"] = project.slug
    _print(result, args.json)
    return 0


def _photos_in(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every photo under ``folder``, sorted; hidden files skipped."""

    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
            continue
        if path.is_file() and looks_like_image_name(rel.name):
            found.append((rel.as_posix(), path))
    return sorted(found)


def cmd_predict(args: argparse.Namespace) -> int:

    folder = Path(args.images)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of photos.")
    items = _photos_in(folder)
    if not items:
        raise InputError(f"There are no photos in {folder} (looked for .jpg, .png, .webp, .tif and similar files).")
    try:
        table = predictor.predict_images(
            Path(args.model), items, device=args.device,
            on_progress=None if args.json else _progress_printer("Tagging photos"),
        )
    except weights.WeightsUnavailable as exc:
        raise InputError(str(exc)) from exc
    rows = []
    for r in table.itertuples(index=False):
        row = {"image": r.image, "predicted_label": r.predicted_label or None,
               "confidence": None if math.isnan(r.confidence) else float(r.confidence)}
        if r.error:
            row["error"] = r.error
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len("photo"), *(len(r["image"]) for r in rows))
    label_width = max(len("label"), *(len(r["predicted_label"] or "") for r in rows))
    print(f"{'photo':<{width}}  {'label':<{label_width}}  confidence")
    for r in rows:
        if "error" in r:
            print(f"{r['image']:<{width}}  {'-':<{label_width}}  -  could not be read: {r['error']}")
        else:
            print(f"{r['image']:<{width}}  {r['predicted_label']:<{label_width}}  {100 * r['confidence']:5.1f} %")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    project = _find_project(args.project)
    if project is None:
        raise InputError(f"No project named {args.project!r}. Projects: "
                         f"{', '.join(p.name for p in workspace.list_projects()) or 'none yet'}.")
    out = report.write_html(project, Path(args.out), question=args.question)
    _print({"project": project.slug, "report": str(out), "bytes": out.stat().st_size}, args.json)
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
    _print(summary.to_dict(), args.json)
    if not args.json:
        print(f"Open it with: streamlit run app.py, then choose the project {args.project!r}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Catalog Lens command line")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print results as JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name, **kwargs):
        return _add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser

    p = sub.add_parser("projects", help="list projects")
    p.set_defaults(func=cmd_projects)

    p = sub.add_parser("create", help="create a project")
    p.add_argument("name")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("intake", help="add photos (files, folders, zips) and a label sheet")
    p.add_argument("--images", nargs="+", required=True, help="photo files, folders or zip archives")
    p.add_argument("--labels", help="label sheet (CSV, TSV, Excel)")
    p.add_argument("--project", help="project name or id (created if new; default: named after the first --images)")
    p.add_argument("--file-column", "--image-column", dest="file_column", help="sheet column with the photo file names")
    p.add_argument("--label-column", help="sheet column with the labels")
    p.set_defaults(func=cmd_intake)

    p = sub.add_parser("backbones", help="list the pretrained networks and whether they are ready")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("weights", help="manage pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("import", parents=[common], help="import a local weights file (checked before use)")
    w.add_argument("--backbone", required=True)
    w.add_argument("--file", required=True)
    w.set_defaults(func=cmd_weights_import)

    p = sub.add_parser("extract", help="compute the features of every photo in a project")
    p.add_argument("--project", required=True)
    p.add_argument("--backbone", help="backbone id (default: the project's, else the recommended one)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train a model from a folder of photos and a label sheet")
    p.add_argument("--images", required=True, help="folder of photos (subfolders included)")
    p.add_argument("--labels", required=True, help="label sheet (CSV, TSV, Excel)")
    p.add_argument("--file-column", help="sheet column with the photo file names (default: guessed)")
    p.add_argument("--label-column", help="sheet column with the labels (default: guessed)")
    p.add_argument("--backbone", help="backbone id (default: the recommended one)")
    p.add_argument("--method", required=True, choices=["frozen", "finetune"])
    p.add_argument("--out", required=True, help="model file to write (.zip)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (--method finetune)")
    p.add_argument("--project", help="keep the work in this project (default: a temporary one)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="tag a folder of photos with a model file")
    p.add_argument("--model", required=True, help="model file (.zip) from train or the app")
    p.add_argument("--images", required=True, help="folder of photos (subfolders included)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="measure speed on this machine")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("extract", parents=[common], help="feature extraction: forward limit, pipeline, naive loop, cache")
    b.add_argument("--images", required=True, help="folder of photos")
    b.add_argument("--backbone")
    b.add_argument("--device", help="auto, cpu, cuda or mps")
    b.add_argument("--upscale", type=int, help="first make JPEG copies with this longer side (e.g. 2000)")
    b.add_argument("--limit", type=int, help="with --upscale: how many photos to copy")
    b.add_argument("--repeats", type=int, default=3)
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("tag", help="tag every row of a catalog export with a model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model file (.zip) from train or the app")
    which.add_argument("--project", help="a project: tag with the model and the confidence setting chosen there")
    p.add_argument("--threshold", type=float, help="confidence needed to give the tag, 0-1 (default: the model's, "
                   "or the project's choice)")
    p.add_argument("--catalog", required=True, help="catalog export (CSV, TSV, Excel)")
    p.add_argument("--image-column", action="append", help="column with the photos (repeat for several)")
    p.add_argument("--images", help="folder or zip with the photos the catalog names")
    p.add_argument("--out", required=True, help="output file (.csv or .xlsx)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    p.add_argument("--rule", default="any", choices=["any", "all", "first", "majority"],
                   help="how several photos of one row combine (default: any photo shows it)")
    p.add_argument("--review-below", type=float, default=0.75, help="flag tags less sure than this")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per checkpoint")
    p.add_argument("--device")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("report", help="write the management report of a project as one HTML file")
    p.add_argument("--project", required=True, help="project name or id")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--question", help="the question the model answers, in your words (default: the saved one)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="build a finished project (every step done) for presentations")
    p.add_argument("--images", required=True, help="folder of labelled photos")
    p.add_argument("--labels", required=True, help="label sheet (CSV, TSV, Excel)")
    p.add_argument("--project", default="Demo", help="project name (default: Demo)")
    p.add_argument("--replace", action="store_true", help="replace a project of the same name")
    p.add_argument("--class-name", action="append", metavar="LABEL=NAME", help="a readable name for a label")
    p.add_argument("--catalog", help="catalog export to tag (default: one row per photo of --images)")
    p.add_argument("--catalog-images", help="folder with the catalog's photos, when not in --images")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the app's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("job-run")  # used by the app to run background jobs
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
