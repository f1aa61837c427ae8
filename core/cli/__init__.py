"""The command line: the same work as the app, for scheduled jobs and big catalogs.

    python -m core projects                      list projects
    python -m core create NAME                   create a project
    python -m core intake --images DIR_OR_ZIP... --labels SHEET [--project NAME] --json
    python -m core backbones                     list the pretrained networks
    python -m core weights import --backbone ID --file FILE
    python -m core extract --project P [--backbone ID] [--device cuda]
    python -m core train --images DIR --labels SHEET --method frozen|finetune --out BUNDLE
    python -m core predict --model BUNDLE --images DIR
    python -m core bench extract --images DIR [--upscale 2000] [--runs 5] [--busy]
    python -m core tag --model BUNDLE|--project P --catalog FILE [--images DIR|ZIP] --out FILE [--resume]
                       [--engine ray [--address ray://HOST:PORT]]
    python -m core export --model BUNDLE --format onnx --out MODEL.onnx
    python -m core report --project P --out FILE.html
    python -m core demo --images DIR --labels SHEET [--project NAME] [--catalog FILE]
    python -m core job-run --project P --job ID  (used by the app to run background jobs)

Every command exits non-zero with a plain message on bad input; ``--json`` prints a
machine-readable result for scripts.
"""

from __future__ import annotations

import argparse
import sys

from core.base.problems import InputError
from core.cli import model_commands, project_commands
from core.inputs.sheets import SHEET_TYPES
from core.tagging import TAG_VALUES

__all__ = ["build_parser", "main"]


SHEETS = "a sheet: " + ", ".join(f".{t}" for t in SHEET_TYPES)


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
    p.set_defaults(func=project_commands.cmd_projects)

    p = sub.add_parser("create", help="create a project")
    p.add_argument("name")
    p.set_defaults(func=project_commands.cmd_create)

    p = sub.add_parser("intake", help="add photos (files, folders, zips) and a label sheet")
    p.add_argument("--images", nargs="+", required=True, help="photo files, folders or zip archives")
    p.add_argument("--labels", help=f"label sheet ({SHEETS})")
    p.add_argument("--project", help="project name or id (created if new; default: named after the first --images)")
    p.add_argument("--file-column", "--image-column", dest="file_column", help="sheet column with the photo file names")
    p.add_argument("--label-column", help="sheet column with the labels")
    p.set_defaults(func=project_commands.cmd_intake)

    p = sub.add_parser("backbones", help="list the pretrained networks and whether they are ready")
    p.set_defaults(func=project_commands.cmd_backbones)

    p = sub.add_parser("weights", help="manage pretrained weights")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    w = wsub.add_parser("import", parents=[common], help="import a local weights file (checked before use)")
    w.add_argument("--backbone", required=True)
    w.add_argument("--file", required=True)
    w.set_defaults(func=project_commands.cmd_weights_import)

    p = sub.add_parser("extract", help="compute the features of every photo in a project")
    p.add_argument("--project", required=True)
    p.add_argument("--backbone", help="backbone id (default: the project's, else the recommended one)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=project_commands.cmd_extract)

    p = sub.add_parser("train", help="train a model from a folder of photos and a label sheet")
    p.add_argument("--images", required=True, help="folder of photos (subfolders included)")
    p.add_argument("--labels", required=True, help=f"label sheet ({SHEETS})")
    p.add_argument("--file-column", help="sheet column with the photo file names (default: guessed)")
    p.add_argument("--label-column", help="sheet column with the labels (default: guessed)")
    p.add_argument("--backbone", help="backbone id (default: the recommended one)")
    p.add_argument("--method", required=True, choices=["frozen", "finetune"])
    p.add_argument("--out", required=True, help="model file to write (.zip)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (--method finetune)")
    p.add_argument("--project", help="keep the work in this project (default: a temporary one)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=model_commands.cmd_train)

    p = sub.add_parser("predict", help="tag a folder of photos with a model file")
    p.add_argument("--model", required=True, help="model file (.zip) from train or the app")
    p.add_argument("--images", required=True, help="folder of photos (subfolders included)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=model_commands.cmd_predict)

    p = sub.add_parser("export", help="export a model file to run outside the app (ONNX)")
    p.add_argument("--model", required=True, help="model file (.zip) from train or the app")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="the format to write (default: onnx)")
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx)")
    p.set_defaults(func=model_commands.cmd_export)

    p = sub.add_parser("bench", help="measure speed on this machine")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    b = bsub.add_parser("extract", parents=[common], help="feature extraction: forward limit, pipeline, naive loop, cache")
    b.add_argument("--images", required=True, help="folder of photos")
    b.add_argument("--backbone")
    b.add_argument("--device", help="auto, cpu, cuda or mps")
    b.add_argument("--upscale", type=int, help="first make JPEG copies with this longer side (e.g. 2000)")
    b.add_argument("--limit", type=int, help="with --upscale: how many photos to copy")
    b.add_argument("--repeats", type=int, default=3, help="timed passes per figure (medians)")
    b.add_argument("--runs", "--repeat", dest="runs", type=int, default=1,
                   help="time the automatic path this many times, each on a fresh cache (choices made anew)")
    b.add_argument("--busy", action="store_true", help="also time it while another process keeps one core busy")
    b.set_defaults(func=project_commands.cmd_bench)

    p = sub.add_parser("tag", help="tag every row of a catalog export with a model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model file (.zip) from train or the app")
    which.add_argument("--project", help="a project: tag with the model and the confidence setting chosen there")
    p.add_argument("--threshold", type=float, help="confidence needed to give the tag, 0-1 (default: the model's, "
                   "or the project's choice)")
    p.add_argument("--catalog", required=True, help=f"catalog export ({SHEETS})")
    p.add_argument("--image-column", action="append", help="column with the photos (repeat for several)")
    p.add_argument("--images", help="folder or zip with the photos the catalog names")
    p.add_argument("--out", required=True, help="output file (.csv, .xlsx or .parquet)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same --out")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (default); ray: Ray Data, for catalogs larger than one machine "
                   "(pip install -r requirements-ray.txt)")
    p.add_argument("--address", help="with --engine ray: a running Ray cluster (ray://HOST:10001 or auto; "
                   "default: start a local one)")
    p.add_argument("--workers", type=int, help="with --engine ray: model copies at once (default: one per CPU)")
    p.add_argument("--cpus", type=int, help="with --engine ray and no --address: CPUs of the local Ray instance")
    p.add_argument("--rule", default="any", choices=["any", "all", "first", "majority"],
                   help="how several photos of one row combine (default: any photo shows it)")
    p.add_argument("--review-below", type=float, default=0.75, help="flag tags less sure than this")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per checkpoint")
    p.add_argument("--fetch-timeout", type=float, metavar="SECONDS",
                   help="most time one photo link may take to download, retries included (default 30)")
    p.add_argument("--tags-as", default="names", choices=TAG_VALUES,
                   help="the tag columns hold the classes' names (default; the label sheet's codes are kept "
                   "in predicted_code) or only the codes")
    p.add_argument("--device")
    p.set_defaults(func=model_commands.cmd_tag)

    p = sub.add_parser("report", help="write the management report of a project as one HTML file")
    p.add_argument("--project", required=True, help="project name or id")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--question", help="the question the model answers, in your words (default: the saved one)")
    p.set_defaults(func=project_commands.cmd_report)

    p = sub.add_parser("demo", help="build a finished project (every step done) for presentations")
    p.add_argument("--images", required=True, help="folder of labelled photos")
    p.add_argument("--labels", required=True, help=f"label sheet ({SHEETS})")
    p.add_argument("--project", default="Demo", help="project name (default: Demo)")
    p.add_argument("--replace", action="store_true", help="replace a project of the same name")
    p.add_argument("--class-name", action="append", metavar="LABEL=NAME", help="a readable name for a label")
    p.add_argument("--catalog", help="catalog export to tag (default: one row per photo of --images)")
    p.add_argument("--catalog-images", help="folder with the catalog's photos, when not in --images")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the app's)")
    p.set_defaults(func=project_commands.cmd_demo)

    p = sub.add_parser("job-run")  # used by the app to run background jobs
    p.add_argument("--project", required=True)
    p.add_argument("--job", required=True)
    p.set_defaults(func=project_commands.cmd_job_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
