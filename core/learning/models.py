"""The one owner of a project's models: trained and imported ones, the one that tags, its threshold.

Every model a project can tag with is listed by :func:`list_models` (its latest trained
run of each kind, then the models imported from elsewhere), each known by its model id.
The analyst chooses which one tags the catalog (:func:`choose_tagging_model`; otherwise
the comparison's recommendation) and, for two-class models, how sure it must be to give
the tag (:func:`set_threshold`). That choice, keyed by model id, is what tagging in the
app and on the command line uses (:func:`predictor`), what a downloaded model file
carries (:func:`export_bundle`) and what the report states.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from core.base.files import atomic_copy, atomic_write_bytes, sha256_file
from core.base.problems import InputError
from core.learning import bundles, onnx_export, runs, training
from core.learning.extraction import feature_store
from core.learning.predictor import Predictor, check_backbone, check_weights, load_network
from core.projects.state import ProjectState
from core.projects.workspace import Project
from core.vision import backbones, weights

__all__ = [
    "choose_tagging_model", "export_bundle", "export_onnx", "get_model", "import_bundle", "list_models", "onnx_file",
    "predictor", "set_threshold", "tagging_model", "threshold",
]


def list_models(project: Project) -> list[dict]:
    """Every model the project can tag with: its latest trained ones first, then imported ones.

    Each entry has ``id``, ``source`` ("trained" or "imported"), ``kind``, ``backbone``,
    ``classes``, ``positive``, ``name``, ``path``, ``created_at`` (ISO date), ``headline``
    (the score in one sentence, "" when unknown), ``own_threshold`` (the model's) and
    ``threshold`` (the one in force: the analyst's choice, else the model's own). Models
    whose file has gone are left out.
    """
    state = ProjectState(project)
    out: list[dict] = []
    trained = sorted(runs.latest_runs(project).values(), key=lambda r: r.created_at, reverse=True)
    for run in trained:
        if not Path(run.bundle_path).is_file():
            continue
        try:
            name = bundles.load_bundle(run.bundle_path)[0].name
        except bundles.BundleError:
            continue
        out.append({
            "id": run.id, "source": "trained", "kind": run.kind, "backbone": run.backbone_id,
            "classes": list(run.classes), "positive": run.positive, "name": name or f"{run.kind} model {run.id}",
            "path": run.bundle_path, "headline": run.headline, "own_threshold": run.threshold,
            "created_at": datetime.fromtimestamp(run.created_at, UTC).isoformat(timespec="seconds"),
        })
    seen = {m["id"] for m in out}
    for m in sorted(state.imported_models, key=lambda m: m.get("imported_at", 0), reverse=True):
        if m.get("id") in seen or not Path(m.get("path", "")).is_file():
            continue
        out.append({
            "id": m["id"], "source": "imported", "kind": m["kind"], "backbone": m["backbone"],
            "classes": list(m["classes"]), "positive": m.get("positive"), "name": m["name"], "path": m["path"],
            "created_at": m["created_at"], "headline": m.get("headline", ""), "own_threshold": m.get("threshold"),
        })
    for m in out:
        chosen = state.threshold(m["id"]) if m["positive"] else None
        m["threshold"] = chosen if chosen is not None else m["own_threshold"]
    return out


def get_model(project: Project, model_id: str) -> dict | None:
    """The :func:`list_models` entry with this id, or None."""
    return next((m for m in list_models(project) if m["id"] == model_id), None)


def tagging_model(project: Project) -> dict | None:
    """The model that tags the catalog: the analyst's choice, else the comparison's
    recommendation, else the latest trained one (an entry of :func:`list_models`)."""
    models = list_models(project)
    if not models:
        return None
    by_id = {m["id"]: m for m in models}
    chosen = ProjectState(project).tagging_model_id
    if chosen in by_id:
        return by_id[chosen]
    latest = runs.latest_runs(project)
    comparison = training.compare(project) if len(latest) == 2 else None
    kind = "finetuned" if comparison is not None and comparison.recommended.lower().startswith("fine") else "frozen"
    run = latest.get(kind) or next(iter(latest.values()), None)
    return by_id.get(run.id) if run is not None and run.id in by_id else models[0]


def choose_tagging_model(project: Project, model_id: str) -> None:
    """Tag the catalog with this model from now on."""
    if get_model(project, model_id) is None:
        raise InputError(f"This project has no model {model_id}; choose one of its trained or imported models.")
    ProjectState(project).choose_tagging_model(model_id)


def threshold(project: Project, model_id: str) -> float | None:
    """The confidence the model needs to give its tag, as in force now (None: not a two-class model)."""
    model = get_model(project, model_id)
    return model["threshold"] if model is not None else None


def set_threshold(project: Project, model_id: str, value: float | None) -> None:
    """Choose how sure a two-class model must be to give the tag (None: back to the model's own)."""
    model = get_model(project, model_id)
    if model is None:
        raise InputError(f"This project has no model {model_id}.")
    if model["positive"] is None:
        raise InputError("A confidence threshold applies to two-class models only.")
    ProjectState(project).set_threshold(model_id, value)


def predictor(project: Project, model: dict | None = None, *, device: str | None = None) -> Predictor:
    """The model (default: the tagging model) loaded once, with the threshold in force and
    the project's feature cache, so photos already extracted are not computed again."""
    model = model or tagging_model(project)
    if model is None:
        raise InputError("This project has no model yet: train one on the Train & compare step first.")
    return Predictor(model["path"], threshold=model["threshold"] if model["positive"] else None, device=device,
                     feature_store=feature_store(project))


def export_bundle(project: Project, model_id: str) -> bytes:
    """The model file as the analyst downloads it: it carries the threshold in force, so
    it tags elsewhere exactly as it does here."""
    model = get_model(project, model_id)
    if model is None:
        raise InputError(f"This project has no model {model_id}.")
    if not model["positive"] or model["threshold"] == model["own_threshold"]:
        return Path(model["path"]).read_bytes()  # the stored file already decides so
    return bundles.repack(model["path"], threshold=model["threshold"])


def _onnx_path(model: dict) -> Path:
    setting = "" if model["threshold"] is None else f"-t{round(1000 * model['threshold'])}"
    return Path(model["path"]).with_name(f"{model['id']}{setting}.onnx")


def onnx_file(project: Project, model_id: str) -> Path | None:
    """The model as an ONNX file (to run without this app), once made by :func:`export_onnx`
    with the threshold in force now; None before."""
    model = get_model(project, model_id)
    path = _onnx_path(model) if model is not None else None
    return path if path is not None and path.is_file() else None


def export_onnx(project: Project, model_id: str) -> Path:
    """Make the ONNX file of a model (:mod:`core.learning.onnx_export`) from the model file as
    the analyst downloads it, so it states the threshold in force; kept beside the model."""
    model = get_model(project, model_id)
    if model is None:
        raise InputError(f"This project has no model {model_id}.")
    out = _onnx_path(model)
    with tempfile.TemporaryDirectory(prefix="catalog-lens-onnx-") as tmp:
        bundle = Path(tmp) / "model.zip"
        bundle.write_bytes(export_bundle(project, model_id))
        return onnx_export.export_model(bundle, out)


# --------------------------------------------------------------------------- importing


def _same_model(a: Path, b: Path) -> bool:
    try:
        same_json = bundles.load_bundle(a)[0].to_dict() == bundles.load_bundle(b)[0].to_dict()
    except bundles.BundleError:
        return False
    return same_json and (a.is_dir() or sha256_file(a) == sha256_file(b))


def _headline(bundle: bundles.ModelBundle) -> str:
    """The bundle's own held-out score in one sentence, "" when it does not carry one."""
    try:
        test = bundle.metrics["test"]
        value, n = float(test["balanced_accuracy"]["value"]), int(test["n"])
    except (KeyError, TypeError, ValueError):
        return ""
    return f"Balanced accuracy {100 * value:.1f} % on {n} held-out photos (as measured where it was trained)."


def import_bundle(project: Project, path: str | os.PathLike) -> str:
    """Check a shared model file and keep a copy in the project; returns the model's id.

    The copy lives in the project's ``models/`` folder and is listed by
    :func:`list_models`. Importing the same model again changes nothing. Raises
    :class:`~core.base.problems.InputError` with a plain sentence when the file is not a
    usable model here (damaged, unsafe, an unknown network, or a frozen head made for
    other backbone weights than the local ones).
    """
    path = Path(path)
    bundle, arrays = bundles.load_bundle(path)  # BundleError: already a plain sentence
    check_backbone(bundle)
    width = backbones.get_backbone(bundle.backbone_id).feature_dim
    if bundle.kind == "frozen" and arrays["scaler.mean"].shape != (width,):
        raise bundles.BundleError(
            f"This model file does not fit its network: {bundle.backbone_id} gives {width} features per photo, "
            f"the model expects {arrays['scaler.mean'].shape[0]}. It is damaged or made for another network.")
    if bundle.kind == "frozen":
        # Refuse a head for other weights now when the check is free; a backbone not yet
        # downloaded is checked when the model is first used (import never downloads).
        if weights.weights_status(bundle.backbone_id).available:
            check_weights(bundle)
    else:
        load_network(path, bundle)  # a network that does not fit is refused now, not mid-catalog
    dest = project.path("models", f"{bundle.id}.zip")
    if dest.exists():
        if not _same_model(path, dest):
            raise InputError(
                f"This project already has a different model with the id {bundle.id}. "
                "Both cannot be kept; delete the other one first."
            )
    elif path.is_dir():
        atomic_write_bytes(dest, bundles.repack(path))
    else:
        atomic_copy(path, dest)
    ProjectState(project).record_imported({
        "id": bundle.id, "kind": bundle.kind, "backbone": bundle.backbone_id, "classes": list(bundle.classes),
        "class_display_names": dict(bundle.class_display_names), "positive": bundle.positive,
        "threshold": bundle.threshold, "name": bundle.name or f"Imported {bundle.kind} model {bundle.id}",
        "path": str(dest), "source_file": path.name, "created_at": bundle.created_at, "imported_at": time.time(),
        "headline": _headline(bundle),
    })
    return bundle.id
