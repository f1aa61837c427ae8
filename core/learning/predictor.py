"""Using a trained model on new photos: a :class:`Predictor` is loaded once and tags many photos.

A model bundle (trained here or shared by a colleague) is checked and loaded once: the
frozen head with the features of its exact backbone weights, or the whole fine-tuned
network on the device. :meth:`Predictor.predict` then gives one row per photo, in order,
never dropping one: a photo that cannot be read gets a plain reason instead of a label.
Labels go through :func:`core.learning.evaluation.predict_labels` with the model's positive
class and the threshold in force (the model's own, or the one the analyst chose), so a
photo gets the same label here as in the app's reports.

A frozen model reuses features already computed: give it the project's
:class:`~core.vision.store.FeatureStore` and photos the project has already extracted cost
nothing; new photos are computed once and kept there too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core.base.files import sha256_file
from core.base.problems import InputError
from core.learning import bundles, finetune_loop, novelty
from core.learning.calibration import apply_calibration
from core.learning.evaluation import predict_labels
from core.vision import backbones, features, weights
from core.vision.device import pick_device
from core.vision.photos import failure_reason
from core.vision.store import FeatureStore

if TYPE_CHECKING:
    import torch

__all__ = ["Predictor", "check_backbone", "check_weights", "predict_images"]

Progress = Callable[[int, int], None]


def check_backbone(bundle: bundles.ModelBundle) -> None:
    """Refuse a bundle whose backbone or preprocessing this app does not reproduce."""
    try:
        backbones.get_backbone(bundle.backbone_id)
    except ValueError:
        raise InputError(
            f"This model uses the network {bundle.backbone_id!r}, which this version of Catalog Lens "
            "does not know. Update the app, or retrain the model here."
        ) from None
    local = backbones.preprocessing_record(bundle.backbone_id)
    # Only the settings both sides know: a setting added in a later version is no mismatch.
    differs = sorted(k for k in set(local) & set(bundle.preprocessing) if local[k] != bundle.preprocessing[k])
    if differs:
        raise InputError(
            f"This model prepared its photos differently ({', '.join(differs)}) from how this version of "
            f"Catalog Lens prepares them for {bundle.backbone_id}, so its answers here would be unreliable. "
            "Retrain the model here, or use the Catalog Lens version it was trained with."
        )


def check_weights(bundle: bundles.ModelBundle) -> None:
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


def load_network(bundle_path: str | os.PathLike, bundle: bundles.ModelBundle):
    """The fine-tuned network of a bundle (eval mode, CPU); BundleError when it does not fit."""
    try:
        return finetune_loop.load_finetuned(bundle.backbone_id, bundle.classes, bundles.load_network_state(bundle_path))
    except ValueError as exc:
        raise bundles.BundleError(f"This model file is damaged: {exc}") from exc


class Predictor:
    """One model bundle, checked and loaded once, ready to tag photos.

    ``threshold`` replaces the bundle's own decision threshold (two-class models: the
    confidence in the positive class needed to give it). ``feature_store`` (frozen models)
    is where features are looked up and kept; without one they live in a temporary folder
    for the predictor's lifetime. Use it as a context manager, or call :meth:`close`.
    Raises :class:`~core.learning.bundles.BundleError` for a file that is not a usable
    model and :class:`~core.base.problems.InputError` for a frozen model trained on other
    backbone weights than the local ones.
    """

    def __init__(self, bundle_path: str | os.PathLike, *, threshold: float | None = None,
                 device: str | torch.device | None = None, batch_size: int | None = None,
                 feature_store: FeatureStore | None = None):
        self.path = Path(bundle_path)
        self.bundle, arrays = bundles.load_bundle(self.path)
        check_backbone(self.bundle)
        if threshold is not None and not (self.bundle.positive and 0.0 < threshold < 1.0):
            raise ValueError(f"A threshold of {threshold!r} does not apply to this model.")
        self.threshold = threshold if threshold is not None else self.bundle.threshold
        self.device = pick_device(device)
        self.batch_size = batch_size
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._store = feature_store
        if self.bundle.kind == "frozen":
            check_weights(self.bundle)
            self._head = bundles.frozen_head_from_bundle(self.bundle, arrays)
        else:
            self._network = load_network(self.path, self.bundle).to(self.device)
        self._novelty = self._load_novelty(arrays)
        self._seen: tuple[list[int], np.ndarray] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.classes)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary feature folder, if one was made."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def predict(self, items: Sequence[tuple[str, str | os.PathLike]], *, ids: Sequence[str] | None = None,
                on_progress: Progress | None = None) -> pd.DataFrame:
        """Tag photos: one row per ``(image name, path)`` item, in order.

        ``ids`` (optional, one per item) are content ids of the photos (the SHA-256 of their
        bytes, as the project names its photos); a frozen model uses them as feature cache
        keys and computes them when not given. Columns: ``image``, ``predicted_label``,
        ``confidence`` (the calibrated probability of the predicted label), ``proba_<class>`` for every
        class, ``error`` ("" or a plain reason why the photo could not be read; such a
        row has no label and NaN numbers) and ``unlike_training`` (True for a photo unlike
        anything the model learned from, :mod:`core.learning.novelty`; its label is a guess).
        """
        names = [str(name) for name, _ in items]
        paths = [Path(path) for _, path in items]
        self._seen = None  # backbone features of the rows read, for the novelty check
        if not paths:
            proba, errors = np.empty((0, len(self.classes))), {}
        elif self.bundle.kind == "frozen":
            proba, errors = self._frozen_proba(paths, ids, on_progress)
        else:
            proba, errors = self._finetuned_proba(paths, on_progress)
        # the confidence the model states is its calibrated one, as on the Train page (the bundle carries it)
        out = self._table(names, apply_calibration(proba, self.bundle.calibration), errors)
        column = {c: j for j, c in enumerate(self.classes)}
        called = np.asarray([column.get(str(label), -1) for label in out["predicted_label"]])
        out["unlike_training"] = self._unlike(paths, ids, errors, called)
        return out

    def _load_novelty(self, arrays) -> novelty.Novelty | None:
        """The bundle's training-photo features, when it has them and this computer's backbone
        weights are the ones they were computed with (a fine-tuned model tags without them)."""
        found = novelty.Novelty.from_arrays(arrays, n_features=backbones.get_backbone(self.bundle.backbone_id).feature_dim)
        if found is not None and self.bundle.kind != "frozen":
            try:
                check_weights(self.bundle)
            except (InputError, weights.WeightsUnavailable):
                return None
        return found

    def _unlike(self, paths: list[Path], ids: Sequence[str] | None, errors: dict[int, str],
                called: np.ndarray) -> np.ndarray:
        """Photos unlike the training photos, or unlike those of the class they were called
        (``called``: each row's class, an index into ``self.classes``; -1 for none)."""
        flags = np.zeros(len(paths), dtype=bool)
        if self._novelty is None or not paths:
            return flags
        if self._seen is None:  # a fine-tuned model: the backbone's pretrained features, once more
            self._frozen_features(paths, ids, None)
        rows, X = self._seen
        flags[rows] = self._novelty.unlike(X, called[rows])
        flags[list(errors)] = False
        return flags

    def _frozen_proba(self, paths: list[Path], ids: Sequence[str] | None, on_progress):
        proba = np.full((len(paths), len(self.classes)), np.nan)
        errors, ok, X = self._frozen_features(paths, ids, on_progress)
        if ok:
            expected = self._head.named_steps["scale"].n_features_in_
            if X.shape[1] != expected:
                raise bundles.BundleError(
                    f"This model expects {expected} features per photo but {self.bundle.backbone_id} gives "
                    f"{X.shape[1]}; the model file is damaged or was made for another network."
                )
            column = {str(c): j for j, c in enumerate(self._head.classes_)}
            proba[ok] = self._head.predict_proba(X)[:, [column[c] for c in self.classes]]
        return proba, errors

    def _frozen_features(self, paths: list[Path], ids: Sequence[str] | None, on_progress):
        """The backbone's features of the photos (computed once, kept in the feature store):
        the reasons of those that could not be read, the rows read and their features."""
        unreadable: dict[int, str] = {}
        if ids is None:
            ids = []
            for row, path in enumerate(paths):
                try:
                    ids.append(sha256_file(path))
                except OSError as exc:
                    ids.append("")
                    unreadable[row] = failure_reason(exc)
        store = self._feature_store()
        result = features.extract_features(
            [(i, p) for i, p in zip(ids, paths, strict=True) if i], backbone_id=self.bundle.backbone_id,
            store=store, device=self.device, batch_size=self.batch_size, on_progress=on_progress,
        )
        failed = dict(result.failed)
        errors = {row: unreadable.get(row) or failed.get(i) or "The photo could not be read."
                  for row, i in enumerate(ids) if not i or i in failed}
        ok = [row for row in range(len(paths)) if row not in errors]
        X = store.load(result.key, [ids[row] for row in ok]) if ok else np.empty((0, 0))
        self._seen = (ok, X)
        return errors, ok, X

    def _feature_store(self) -> FeatureStore:
        if self._store is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="catalog-lens-predict-")
            self._store = FeatureStore(Path(self._tmp.name))
        return self._store

    def _finetuned_proba(self, paths: list[Path], on_progress):
        errors: dict[int, str] = {}
        proba = finetune_loop.predict_proba(
            self._network, [(str(i), p) for i, p in enumerate(paths)], backbone_id=self.bundle.backbone_id,
            device=self.device, batch_size=self.batch_size, on_progress=on_progress,
            on_failure=lambda key, reason: errors.__setitem__(int(key), reason),
        )
        order = sorted(self.classes)  # predict_proba's columns follow the sorted class names
        proba = proba[:, [order.index(c) for c in self.classes]]
        for i in np.flatnonzero(np.isnan(proba).any(axis=1)):
            errors.setdefault(int(i), "The photo could not be read.")
        return proba, errors

    def _table(self, names: list[str], proba: np.ndarray, errors: dict[int, str]) -> pd.DataFrame:
        ok = ~np.isnan(proba).any(axis=1)
        predicted = np.full(len(names), "", dtype=object)
        confidence = np.full(len(names), np.nan)
        if ok.any():
            labels = predict_labels(proba[ok], classes=self.classes, positive=self.bundle.positive,
                                    threshold=self.threshold)
            column = {c: j for j, c in enumerate(self.classes)}
            predicted[ok] = labels
            confidence[ok] = proba[ok][np.arange(len(labels)), [column[str(c)] for c in labels]]
        out = pd.DataFrame({"image": names, "predicted_label": predicted, "confidence": confidence})
        for j, c in enumerate(self.classes):
            out[f"proba_{c}"] = proba[:, j]
        out["error"] = [errors.get(i, "") for i in range(len(names))]
        return out


def predict_images(bundle_path: str | os.PathLike, items: Sequence[tuple[str, str | os.PathLike]], *,
                   threshold: float | None = None, device: str | None = None, batch_size: int | None = None,
                   on_progress: Progress | None = None) -> pd.DataFrame:
    """Tag one list of photos with a model file (see :meth:`Predictor.predict`). For many
    lists, keep one :class:`Predictor` instead: it loads the model once."""
    with Predictor(bundle_path, threshold=threshold, device=device, batch_size=batch_size) as predictor:
        return predictor.predict(items, on_progress=on_progress)
