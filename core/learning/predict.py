"""Using a trained model on new photos, and bringing models in from elsewhere.

:func:`predict_images` runs a model bundle (trained here or shared by a colleague) over
any list of photos and gives one row per photo, in order, never dropping one: a photo
that cannot be read gets a plain reason instead of a label. Labels go through
:func:`core.learning.evaluation.predict_labels` with the bundle's own positive class and
threshold, so a photo gets the same label here as in the app's reports.

:func:`import_bundle` checks a shared bundle and keeps a copy in a project's ``models/``
folder; :func:`list_models` lists what a project can tag with.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.base.files import atomic_copy, sha256_file
from core.base.problems import InputError
from core.learning import bundles, finetune_loop
from core.projects.workspace import Project
from core.vision import backbones, features, weights
from core.vision.store import FeatureStore

__all__ = ["import_bundle", "list_models", "predict_images"]

Progress = Callable[[int, int], None]
IMPORTED_META = "imported_models"


# --------------------------------------------------------------------------- checks


def _check_backbone(bundle: bundles.ModelBundle) -> None:
    """Refuse a bundle whose backbone or preprocessing this app does not reproduce."""
    from core.learning import training

    try:
        backbones.get_backbone(bundle.backbone_id)
    except ValueError:
        raise InputError(
            f"This model uses the network {bundle.backbone_id!r}, which this version of Catalog Lens "
            "does not know. Update the app, or retrain the model here."
        ) from None
    local = training._preprocessing_dict(bundle.backbone_id)
    # Only the settings both sides know: a setting added in a later version is no mismatch.
    differs = sorted(k for k in set(local) & set(bundle.preprocessing) if local[k] != bundle.preprocessing[k])
    if differs:
        raise InputError(
            f"This model prepared its photos differently ({', '.join(differs)}) from how this version of "
            f"Catalog Lens prepares them for {bundle.backbone_id}, so its answers here would be unreliable. "
            "Retrain the model here, or use the Catalog Lens version it was trained with."
        )


def _check_weights(bundle: bundles.ModelBundle) -> None:
    """A frozen head only means something on features of the exact weights it was trained on."""
    weights.ensure_weights(bundle.backbone_id)  # WeightsUnavailable says how to get them
    local = weights.weights_hash(bundle.backbone_id)
    if local != bundle.weights_hash:
        name = backbones.get_backbone(bundle.backbone_id).name
        raise InputError(
            f"This model was trained with other weights for {name} (file fingerprint "
            f"{bundle.weights_hash[:12]}) than the ones on this computer ({local[:12]}), so its answers "
            "here would be meaningless. Import the weights it was trained with "
            f"(python -m core weights import --backbone {bundle.backbone_id} --file ...), or retrain the model here."
        )


# --------------------------------------------------------------------------- predicting


def _frozen_proba(
    bundle: bundles.ModelBundle,
    arrays: dict[str, np.ndarray],
    paths: list[Path],
    *,
    device,
    batch_size: int | None,
    on_progress: Progress | None,
) -> tuple[np.ndarray, dict[int, str]]:
    _check_weights(bundle)
    head = bundles.frozen_head_from_bundle(bundle, arrays)
    proba = np.full((len(paths), len(bundle.classes)), np.nan)
    errors: dict[int, str] = {}
    # Positions as ids: two rows with the same photo stay two rows.
    items = [(str(i), p) for i, p in enumerate(paths)]
    with tempfile.TemporaryDirectory(prefix="catalog-lens-predict-") as tmp:
        store = FeatureStore(Path(tmp))
        result = features.extract_features(
            items, backbone_id=bundle.backbone_id, store=store, device=device,
            batch_size=batch_size, on_progress=on_progress,
        )
        for key, reason in result.failed:
            errors[int(key)] = reason
        ok = [i for i in range(len(paths)) if i not in errors]
        if ok:
            X = store.load(result.key, [str(i) for i in ok])
            expected = head.named_steps["scale"].n_features_in_
            if X.shape[1] != expected:
                raise bundles.BundleError(
                    f"This model expects {expected} features per photo but {bundle.backbone_id} gives "
                    f"{X.shape[1]}; the model file is damaged or was made for another network."
                )
            p = head.predict_proba(X)
            column = {str(c): j for j, c in enumerate(head.classes_)}
            proba[ok] = p[:, [column[c] for c in bundle.classes]]
    return proba, errors


def _finetuned_proba(
    bundle_path: Path,
    bundle: bundles.ModelBundle,
    paths: list[Path],
    *,
    device,
    batch_size: int | None,
    on_progress: Progress | None,
) -> tuple[np.ndarray, dict[int, str]]:
    state = bundles.load_network_state(bundle_path)
    try:
        model = finetune_loop.load_finetuned(bundle.backbone_id, bundle.classes, state)
    except ValueError as exc:
        raise bundles.BundleError(f"This model file is damaged: {exc}") from exc
    errors: dict[int, str] = {}
    items = [(str(i), p) for i, p in enumerate(paths)]
    proba = finetune_loop.predict_proba(
        model, items, backbone_id=bundle.backbone_id, device=device, batch_size=batch_size,
        on_progress=on_progress, on_failure=lambda key, reason: errors.__setitem__(int(key), reason),
    )
    # predict_proba's columns follow the sorted class names; the bundle's order may not.
    order = sorted(bundle.classes)
    proba = proba[:, [order.index(c) for c in bundle.classes]]
    for i in np.flatnonzero(np.isnan(proba).any(axis=1)):
        errors.setdefault(int(i), "The photo could not be read.")
    return proba, errors


def predict_images(
    bundle_path: str | os.PathLike,
    items: Sequence[tuple[str, Path]],
    *,
    device: str | None = None,
    batch_size: int | None = None,
    on_progress: Progress | None = None,
) -> pd.DataFrame:
    """Tag photos with a model bundle: one row per ``(image name, path)`` item, in order.

    Columns: ``image``, ``predicted_label``, ``confidence`` (the probability of the
    predicted label), ``proba_<class>`` for every class, and ``error`` ("" or a plain
    reason why the photo could not be read; such a row has no label and NaN numbers).
    Raises :class:`~core.learning.bundles.BundleError` for a file that is not a usable model and
    :class:`~core.base.problems.InputError` (a ``ValueError``) for a frozen model trained on
    other backbone weights than the local ones.
    """
    from core.learning import evaluation

    bundle_path = Path(bundle_path)
    bundle, arrays = bundles.load_bundle(bundle_path)
    _check_backbone(bundle)
    names = [str(name) for name, _ in items]
    paths = [Path(path) for _, path in items]
    if not paths:
        proba, errors = np.empty((0, len(bundle.classes))), {}
    elif bundle.kind == "frozen":
        proba, errors = _frozen_proba(
            bundle, arrays, paths, device=device, batch_size=batch_size, on_progress=on_progress
        )
    else:
        proba, errors = _finetuned_proba(
            bundle_path, bundle, paths, device=device, batch_size=batch_size, on_progress=on_progress
        )

    ok = ~np.isnan(proba).any(axis=1)
    predicted = np.full(len(paths), "", dtype=object)
    confidence = np.full(len(paths), np.nan)
    if ok.any():
        labels = evaluation.predict_labels(
            proba[ok], classes=bundle.classes, positive=bundle.positive, threshold=bundle.threshold
        )
        column = {c: j for j, c in enumerate(bundle.classes)}
        predicted[ok] = labels
        confidence[ok] = proba[ok][np.arange(len(labels)), [column[str(c)] for c in labels]]
    out = pd.DataFrame({"image": names, "predicted_label": predicted, "confidence": confidence})
    for j, c in enumerate(bundle.classes):
        out[f"proba_{c}"] = proba[:, j]
    out["error"] = [errors.get(i, "") for i in range(len(paths))]
    return out


# --------------------------------------------------------------------------- importing


def _zip_folder(folder: Path, dest: Path) -> None:
    """Store a bundle folder as a zip (atomically), holding only the bundle's own files."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
                for name in bundles.MAX_SIZES:
                    if (folder / name).is_file():
                        zf.write(folder / name, name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _same_model(a: Path, b: Path) -> bool:
    with contextlib.suppress(bundles.BundleError):
        return bundles.load_bundle(a)[0].to_dict() == bundles.load_bundle(b)[0].to_dict() and (
            a.is_dir() or sha256_file(a) == sha256_file(b)
        )
    return False


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
    bundle, _ = bundles.load_bundle(path)  # BundleError: already a plain sentence
    _check_backbone(bundle)
    if bundle.kind == "frozen":
        # Refuse a head for other weights now when the check is free; a backbone not yet
        # downloaded is checked when the model is first used (import never downloads).
        if weights.weights_status(bundle.backbone_id).available:
            _check_weights(bundle)
    else:
            # Build the network once now, so a model that does not fit is refused at import
        # rather than half-way through tagging a catalog.
        try:
            finetune_loop.load_finetuned(bundle.backbone_id, bundle.classes, bundles.load_network_state(path))
        except ValueError as exc:
            raise bundles.BundleError(f"This model file is damaged: {exc}") from exc

    dest = project.path("models", f"{bundle.id}.zip")
    if dest.exists():
        if not _same_model(path, dest):
            raise InputError(
                f"This project already has a different model with the id {bundle.id}. "
                "Both cannot be kept; delete the other one first."
            )
    elif path.is_dir():
        _zip_folder(path, dest)
    else:
        atomic_copy(path, dest)

    record = {
        "id": bundle.id,
        "kind": bundle.kind,
        "backbone": bundle.backbone_id,
        "classes": list(bundle.classes),
        "class_display_names": dict(bundle.class_display_names),
        "positive": bundle.positive,
        "threshold": bundle.threshold,
        "name": bundle.name or f"Imported {bundle.kind} model {bundle.id}",
        "path": str(dest),
        "source_file": path.name,
        "created_at": bundle.created_at,
        "imported_at": time.time(),
        "headline": _headline(bundle),
    }
    # Read-modify-write in one transaction: two sessions importing at once both get kept.
    with project.db() as con:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (IMPORTED_META,)).fetchone()
        models = [m for m in (json.loads(row[0]) if row else []) if m.get("id") != bundle.id]
        models.append(record)
        con.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (IMPORTED_META, json.dumps(models)),
        )
    return bundle.id


def list_models(project: Project) -> list[dict]:
    """Every model the project can tag with: its latest trained ones first, then imported ones.

    Each entry has ``id``, ``source`` ("trained" or "imported"), ``kind``, ``backbone``,
    ``classes``, ``name``, ``path``, ``created_at`` (ISO date) and ``headline`` (the score
    in one sentence, "" when unknown). Models whose file has gone are left out.
    """
    from datetime import datetime, timezone

    out: list[dict] = []
    from core.learning import training

    runs = sorted(training.latest_runs(project).values(), key=lambda r: r.created_at, reverse=True)
    for run in runs:
        if not Path(run.bundle_path).is_file():
            continue
        try:
            name = bundles.load_bundle(run.bundle_path)[0].name
        except bundles.BundleError:
            continue
        out.append({
            "id": run.id, "source": "trained", "kind": run.kind, "backbone": run.backbone_id,
            "classes": list(run.classes), "name": name or f"{run.kind} model {run.id}",
            "path": run.bundle_path,
            "created_at": datetime.fromtimestamp(run.created_at, timezone.utc).isoformat(timespec="seconds"),
            "headline": run.headline,
        })
    trained = {m["id"] for m in out}
    imported = sorted(project.get_meta(IMPORTED_META, []) or [], key=lambda m: m.get("imported_at", 0), reverse=True)
    for m in imported:
        if m.get("id") in trained or not Path(m.get("path", "")).is_file():
            continue
        out.append({
            "id": m["id"], "source": "imported", "kind": m["kind"], "backbone": m["backbone"],
            "classes": list(m["classes"]), "name": m["name"], "path": m["path"],
            "created_at": m["created_at"], "headline": m.get("headline", ""),
        })
    return out
