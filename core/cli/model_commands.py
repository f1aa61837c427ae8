"""Commands about models: train one from a folder, predict a folder, export one, tag a catalog export."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

from core import tagging
from core.base.files import atomic_copy
from core.base.problems import InputError
from core.cli.common import find_project, print_result, progress_printer
from core.inputs import fetch
from core.inputs.images import looks_like_image_name
from core.learning import bundles, extraction, finetune_config, models, novelty, onnx_export, predictor, training
from core.projects import intake, workspace
from core.tagging import distributed
from core.vision import backbones, weights


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
        return (lambda *done_total_message: None) if args.json else progress_printer(label)

    project = find_project(args.project) if args.project else None
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
    print_result(result, args.json)
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
            on_progress=None if args.json else progress_printer("Tagging photos"),
        )
    except weights.WeightsUnavailable as exc:
        raise InputError(str(exc)) from exc
    rows = []
    for r in table.itertuples(index=False):
        row = {"image": r.image, "predicted_label": r.predicted_label or None,
               "confidence": None if math.isnan(r.confidence) else float(r.confidence)}
        if r.error:
            row["error"] = r.error
        elif r.unlike_training:
            row["needs_review"] = novelty.REASON
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
            check = f"  (check it: {r['needs_review']})" if "needs_review" in r else ""
            print(f"{r['image']:<{width}}  {r['predicted_label']:<{label_width}}  {100 * r['confidence']:5.1f} %{check}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.exists():
        raise InputError(f"The model file {model} does not exist.")
    try:
        out = onnx_export.export_model(model, Path(args.out), fmt=args.format)
    except weights.WeightsUnavailable as exc:
        raise InputError(str(exc)) from exc
    bundle, _ = bundles.load_bundle(model)
    print_result({"out": str(out), "format": args.format, "kind": bundle.kind, "classes": list(bundle.classes),
                  "megabytes": round(out.stat().st_size / 1e6, 1)}, args.json)
    return 0


def _tagging_model(args: argparse.Namespace) -> tuple[Path, float | None, workspace.Project | None]:
    """The model file, its threshold and the project (if any) a ``tag`` command uses:
    ``--model FILE`` with its own threshold, or ``--project P`` with the model and threshold
    chosen in that project; ``--threshold`` replaces either."""
    if args.project:
        project = find_project(args.project)
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
    if args.engine != "ray" and (args.address or args.workers or args.cpus):
        raise InputError("--address, --workers and --cpus go with --engine ray.")
    bundle_path, threshold, project = _tagging_model(args)
    if args.fetch_timeout is not None:  # read by every Fetcher this command makes
        if not args.fetch_timeout > 0:
            raise InputError("--fetch-timeout must be a number of seconds above 0.")
        os.environ[fetch.TIMEOUT_ENV] = str(args.fetch_timeout)
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
    show = None if args.json else lambda d, t, m: progress_printer(m)(d, t)
    files = tagging.project_photo_files(project) if project else None
    if args.engine == "ray":
        summary = distributed.run_tagging_on_ray(folder, address=args.address, num_cpus=args.cpus,
                                                 workers=args.workers, device=args.device, project_files=files,
                                                 on_progress=show)
    else:
        summary = tagging.run_tagging(folder, device=args.device, project_files=files, on_progress=show,
                                      feature_store=extraction.feature_store(project) if project else None)
    tagging.write_output(folder, out, tags_as=args.tags_as, names=project.class_names() if project else None)
    result = {**summary.to_dict(), "out": str(out), "checkpoint": str(folder), "model_id": tagging.load_run(folder)["model_id"],
              "threshold": tagging.load_run(folder).get("threshold")}
    print_result(result, args.json)
    return 0
