"""A ready-made project for presentations: every step of the journey done, from photos and a sheet.

``python -m core demo --images DIR --labels SHEET`` runs intake, feature extraction, the
quick model, the fine-tuned network, the map and a tagged catalog, so the app opens on
finished results. The catalog is the one given, or else one row per photo of ``DIR``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core import tagging
from core.base.problems import InputError
from core.inputs.images import looks_like_image_name
from core.learning import explore, extraction, finetune_config, models, runs, training
from core.projects import intake, workspace
from core.projects.state import ProjectState
from core.vision import backbones

Say = Callable[[str], None]


@dataclass
class DemoSummary:
    project: str
    photos: int = 0
    labelled: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    quick_model: str = ""
    fine_tuned: str = ""
    verdict: str = ""
    catalog_rows: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _catalog_of(folder: Path) -> bytes:
    """A catalog export listing every photo of a folder, one product per row."""
    photos = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.is_file() and looks_like_image_name(p.name))
    rows = "".join(f"DEMO-{i + 1:05d},{Path(name).stem},{name}\n" for i, name in enumerate(photos))
    return ("sku,title,image\n" + rows).encode()


def build_demo(
    images: Path,
    labels: Path,
    *,
    name: str = "Demo",
    replace: bool = False,
    class_names: dict[str, str] | None = None,
    catalog: Path | None = None,
    catalog_images: Path | None = None,
    epochs: int | None = None,
    backbone: str | None = None,
    say: Say = lambda message: None,
) -> DemoSummary:
    """Build the project ``name`` through every step; returns what was done and how long each step took."""
    images, labels = Path(images), Path(labels)
    if not images.is_dir():
        raise InputError(f"{images} is not a folder of photos.")
    if not labels.is_file():
        raise InputError(f"The label sheet {labels} does not exist.")
    if catalog is not None and not Path(catalog).is_file():
        raise InputError(f"The catalog {catalog} does not exist.")
    slug = workspace.slugify(name)
    if any(p.slug == slug for p in workspace.list_projects()):
        if not replace:
            raise InputError(f"A project named {name!r} already exists: choose another --project name or add --replace.")
        workspace.delete_project(slug)
    project = workspace.create_project(name)
    summary = DemoSummary(project=project.slug)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary.seconds[step] = round(now - clock, 1)
        clock = now
        say(f"{step}: done in {summary.seconds[step]:.1f} s")

    say(f"Checking the photos in {images}…")
    intake.stage_folder(project, images)
    intake.process_staged(project)
    intake.apply_sheet(project, filename=labels.name, data=labels.read_bytes())
    if class_names:
        project.set_class_names(class_names)
    data = project.training_set()
    summary.photos = int(project.query("SELECT COUNT(*) FROM images")[0][0])
    summary.labelled = len(data)
    summary.classes = {str(k): int(v) for k, v in data["label"].value_counts().items()}
    lap("intake")

    backbone = backbone or backbones.DEFAULT_BACKBONE_ID
    ProjectState(project).set_backbone(backbone)
    say(f"Describing every photo with {backbones.get_backbone(backbone).name}…")
    extraction.extract_project(project, backbone)
    lap("features")

    say("Training the quick model…")
    summary.quick_model = training.train_frozen(project, backbone_id=backbone).headline
    lap("quick model")
    say("Fine-tuning the network (the longest step)…")
    config = finetune_config.FinetuneConfig(epochs=epochs) if epochs else finetune_config.FinetuneConfig()
    tuned = training.train_finetuned(project, backbone_id=backbone, config=config)
    summary.fine_tuned = tuned.headline if tuned else ""
    comparison = training.compare(project, names=("Quick model", "Fine-tuned network"))
    summary.verdict = comparison.verdict if comparison else ""
    lap("fine-tuned network")

    say("Drawing the map…")
    explore.feature_map(project)
    ProjectState(project).mark_explored(runs.latest_runs(project)["frozen"].id)
    lap("map")

    say("Tagging the catalog…")
    model = models.tagging_model(project)
    if catalog is not None:
        catalog_name, catalog_data = Path(catalog).name, Path(catalog).read_bytes()
    else:
        catalog_name, catalog_data, catalog_images = "catalog-export.csv", _catalog_of(images), catalog_images or images
    run_id = tagging.start_project_run(  # the photo columns are guessed from the catalog
        project, catalog_name=catalog_name, catalog_data=catalog_data, bundle_path=Path(model["path"]),
        options=tagging.TagOptions(image_columns=[]), images_dir=catalog_images,
        threshold=model["threshold"] if model["positive"] else None)
    folder = tagging.project_run_folder(project, run_id)
    tagged = tagging.run_tagging(folder, project_files=tagging.project_photo_files(project),
                                 feature_store=extraction.feature_store(project))
    summary.catalog_rows = tagged.rows
    lap("tagging")
    return summary
