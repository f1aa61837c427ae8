"""Model bundles: a trained model as one shareable zip of JSON + safetensors, no pickle.

Layout of a bundle (a ``.zip``, or a folder with the same files)::

    bundle.json           what the model is: backbone, preprocessing, classes, threshold,
                          scores, split, library versions, training manifest
    head.safetensors      the classifier head's arrays (frozen models)
    network.safetensors   the fine-tuned network's state_dict (fine-tuned models)

Bundles come from users (shared by e-mail, downloaded, uploaded), so loading treats them
as untrusted input: an allow-list of member names, size limits, strict JSON validation,
and tensors only through safetensors, which cannot execute code. What a member declares
(its size, its arrays' shapes) is checked by :mod:`core.learning.bundle_limits` before its
data is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Literal

import numpy as np

from core.base.files import atomic_file
from core.learning import bundle_limits as limits
from core.learning.bundle_limits import BundleError
from core.learning.calibration import Calibration
from core.learning.heads import head_from_arrays

__all__ = [
    "BUNDLE_JSON", "FORMAT", "HEAD_FILE", "NETWORK_FILE", "SCHEMA_VERSION", "BundleError",
    "ModelBundle", "frozen_head_from_bundle", "ids_hash", "library_versions", "load_bundle",
    "load_network_state", "new_bundle_id", "repack", "save_bundle", "training_manifest"
]

FORMAT = "catalog-lens-model"
SCHEMA_VERSION = 1
BUNDLE_JSON = "bundle.json"
HEAD_FILE = "head.safetensors"
NETWORK_FILE = "network.safetensors"
# Largest believable size of each member (uncompressed). bundle.json holds the split
# plan, i.e. every photo id: 50,000 ids of 64 hex characters in two lists is ~7 MB.
MAX_SIZES = {BUNDLE_JSON: 64 << 20, HEAD_FILE: 256 << 20, NETWORK_FILE: 2 << 30}
KINDS = ("frozen", "finetuned")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # ids name files: nothing path-like
_CODE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".py")


def new_bundle_id() -> str:
    return uuid.uuid4().hex[:12]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries a model's numbers depend on (read without importing them)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "scikit-learn", "numpy", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def ids_hash(ids: Sequence[str]) -> str:
    """SHA-256 of the sorted photo ids: the same photos give the same hash in any order."""
    h = hashlib.sha256()
    for i in sorted(str(i) for i in ids):
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def training_manifest(ids: Sequence[str], y: Sequence[str]) -> dict[str, Any]:
    """What the model was trained on: photo count, photos per class, hash of the ids."""
    labels, counts = np.unique(np.asarray([str(v) for v in y]), return_counts=True)
    return {
        "n_photos": len(ids),
        "per_class": {str(c): int(n) for c, n in zip(labels, counts, strict=True)},
        "ids_sha256": ids_hash(ids),
    }


@dataclass
class ModelBundle:
    """Everything needed to reuse, audit or reproduce a trained model, apart from its arrays."""

    kind: Literal["frozen", "finetuned"]
    backbone_id: str
    weights_hash: str
    preprocessing: dict[str, Any]
    classes: list[str]
    class_display_names: dict[str, str] = field(default_factory=dict)
    positive: str | None = None
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    split: dict[str, Any] = field(default_factory=dict)
    training_manifest: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    calibration: dict[str, Any] | None = None  # applied to every probability (core.learning.calibration)
    id: str = field(default_factory=new_bundle_id)
    created_at: str = field(default_factory=_now)
    library_versions: dict[str, str | None] = field(default_factory=library_versions)

    def display_name(self, cls: str) -> str:
        return self.class_display_names.get(cls, cls)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Any) -> ModelBundle:
        """Validate ``bundle.json`` content strictly; raises :class:`BundleError` saying what is wrong."""
        _validate(d)
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def _is_version_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and (x is None or isinstance(x, str)) for k, x in v.items())


# field -> (check, description for the error message, required)
_SCHEMA = {
    "format": (_is_str, "text", True),
    "schema_version": (_is_int, "a whole number", True),
    "id": (_is_str, "text", True),
    "kind": (_is_str, "text", True),
    "backbone_id": (_is_str, "text", True),
    "weights_hash": (_is_str, "text", True),
    "preprocessing": (lambda v: isinstance(v, dict), "an object", True),
    "classes": (_is_str_list, "a list of texts", True),
    "class_display_names": (_is_str_map, "an object of texts", True),
    "positive": (lambda v: v is None or _is_str(v), "text or null", True),
    "threshold": (lambda v: v is None or _is_num(v), "a number or null", True),
    "metrics": (lambda v: isinstance(v, dict), "an object", True),
    "seed": (_is_int, "a whole number", True),
    "split": (lambda v: isinstance(v, dict), "an object", True),
    "created_at": (_is_str, "text", True),
    "library_versions": (_is_version_map, "an object of version texts", True),
    "training_manifest": (lambda v: isinstance(v, dict), "an object", True),
    "name": (_is_str, "text", False),
    "calibration": (lambda v: v is None or isinstance(v, dict), "an object or null", False),
}


def _validate(d: Any) -> None:
    bad = "This file is not a valid Catalog Lens model: "
    if not isinstance(d, dict):
        raise BundleError(bad + "bundle.json does not hold a JSON object.")
    if d.get("format") != FORMAT:
        raise BundleError(bad + f"bundle.json does not say format {FORMAT!r}.")
    version = d.get("schema_version")
    if not _is_int(version):
        raise BundleError(bad + "bundle.json has no schema version.")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"This model was saved by a newer Catalog Lens (model format {version}; this app reads up to "
            f"{SCHEMA_VERSION}). Update the app to open it."
        )
    if version != SCHEMA_VERSION:
        raise BundleError(bad + f"unknown model format {version}.")
    missing = [k for k, (_, _, req) in _SCHEMA.items() if req and k not in d]
    if missing:
        raise BundleError(bad + f"bundle.json lacks {', '.join(missing)}.")
    unknown = sorted(set(d) - set(_SCHEMA))
    if unknown:
        raise BundleError(bad + f"bundle.json has unexpected entries {unknown}.")
    for k, (check, what, _) in _SCHEMA.items():
        if k in d and not check(d[k]):
            raise BundleError(bad + f"in bundle.json, {k} should be {what}, found {type(d[k]).__name__}.")
    if not _ID_RE.fullmatch(d["id"]):
        raise BundleError(bad + f"its id {d['id'][:80]!r} is not a short code of letters, digits, '-' and '_'.")
    if d["kind"] not in KINDS:
        raise BundleError(bad + f"kind is {d['kind']!r}, expected one of {KINDS}.")
    classes = d["classes"]
    limits.check_classes(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
        raise BundleError(bad + f"it needs at least two different, non-empty class names, found {classes}.")
    if not set(d["class_display_names"]) <= set(classes):
        raise BundleError(bad + "class_display_names names classes the model does not have.")
    if len(classes) == 2:
        if d["positive"] not in classes:
            raise BundleError(bad + f"the positive class {d['positive']!r} is not one of {classes}.")
        t = d["threshold"]
        if t is None or not 0.0 <= float(t) <= 1.0:
            raise BundleError(bad + f"a two-class model needs a threshold between 0 and 1, found {t!r}.")
    elif d["positive"] is not None or d["threshold"] is not None:
        raise BundleError(bad + "only two-class models have a positive class and a threshold.")
    if d.get("calibration") is not None:
        try:
            if Calibration.from_dict(d["calibration"]).positive >= len(classes):
                raise ValueError("it names a class the model does not have")
        except ValueError as exc:
            raise BundleError(bad + f"its confidence calibration cannot be used: {exc}.") from None
    try:
        datetime.fromisoformat(d["created_at"])
    except ValueError:
        raise BundleError(bad + f"created_at {d['created_at']!r} is not a date.") from None


# --------------------------------------------------------------------------- saving


def _to_numpy(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):  # a torch tensor; avoid importing torch for plain arrays
            v = v.detach().cpu().numpy()
        out[str(k)] = np.ascontiguousarray(v)
    return out


def _network_bytes(state: Mapping[str, Any]) -> bytes:
    if not any(hasattr(v, "detach") for v in state.values()):
        from safetensors.numpy import save

        return save(_to_numpy(state), metadata={"format": FORMAT})
    import torch
    from safetensors.torch import save

    # clone(): safetensors refuses tensors sharing storage (tied weights); a state_dict
    # load copies values, so the sharing need not survive.
    tensors = {
        str(k): (torch.from_numpy(np.asarray(v)) if not hasattr(v, "detach") else v.detach()).cpu().contiguous().clone()
        for k, v in state.items()
    }
    return save(tensors, metadata={"format": FORMAT})


def save_bundle(
    bundle: ModelBundle,
    arrays: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    network: Mapping[str, Any] | None = None,
) -> Path:
    """Write the bundle as one zip, atomically; returns the file written.

    ``arrays`` are the head's arrays (:func:`core.learning.heads.head_to_arrays`), ``network`` a
    fine-tuned model's ``state_dict``. If ``path`` is a folder the file is named after
    the bundle id. The bundle is validated first, so an invalid model is never written.
    """
    d = bundle.to_dict()
    _validate(json.loads(json.dumps(d)))
    if bundle.kind == "finetuned" and not network:
        raise ValueError("A fine-tuned model bundle needs its network weights (network=state_dict).")
    if bundle.kind == "frozen" and network:
        raise ValueError("A frozen model bundle has no network weights; its backbone is named by backbone_id.")
    head = _to_numpy(arrays)
    if bundle.kind == "frozen":
        head_from_arrays(head, bundle.classes)  # refuses arrays that do not fit the classes
    from safetensors.numpy import save

    members = {
        BUNDLE_JSON: json.dumps(d, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8"),
        HEAD_FILE: save(head, metadata={"format": FORMAT}),
    }
    if network:
        members[NETWORK_FILE] = _network_bytes(network)

    path = Path(path)
    if path.is_dir():
        path = path / f"catalog-lens-model-{bundle.id}.zip"
    with atomic_file(path) as fh:
        _write_zip(fh, members)
    return path


def _write_zip(fh: BinaryIO, members: Mapping[str, bytes]) -> None:
    with zipfile.ZipFile(fh, "w", allowZip64=True) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            # Float arrays do not compress; only the JSON is worth deflating.
            info.compress_type = zipfile.ZIP_DEFLATED if name == BUNDLE_JSON else zipfile.ZIP_STORED
            zf.writestr(info, data)


def repack(source: str | os.PathLike, *, threshold: float | None = None) -> bytes:
    """A bundle (zip or folder) as the bytes of a clean zip holding only its own files,
    optionally with another decision ``threshold`` written into it (what the analyst chose
    for this model, so that the file decides as the app does). Validated like any bundle."""
    raw, _ = _read_members(source, tuple(MAX_SIZES))
    bundle = _parse_json(raw[BUNDLE_JSON])
    if threshold is not None and threshold != bundle.threshold:
        if bundle.positive is None or not 0.0 < threshold < 1.0:
            raise BundleError(f"A threshold of {threshold!r} does not apply to this model.")
        d = bundle.to_dict()
        d["metrics"] = {**d["metrics"], "threshold_of_training": bundle.threshold}
        d["threshold"] = float(threshold)
        _validate(d)
        raw[BUNDLE_JSON] = json.dumps(d, indent=1, ensure_ascii=False, allow_nan=False).encode("utf-8")
    buf = io.BytesIO()
    _write_zip(buf, {name: raw[name] for name in MAX_SIZES if name in raw})
    return buf.getvalue()


# --------------------------------------------------------------------------- loading


_MAX_ENTRIES = 64  # a model holds 3 files; a zipped folder adds folder and macOS entries
_OS_JUNK = (".DS_Store", "Thumbs.db", "desktop.ini")


def _check_safe_name(name: str) -> None:
    parts = PurePosixPath(name).parts
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or ":" in name
        or any(part in ("..", ".") for part in parts)
    ):
        raise BundleError(f"This model file is unsafe: it contains the path {name!r}, which points outside the model.")


def _is_os_junk(parts: tuple[str, ...]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1] in _OS_JUNK or parts[-1].startswith("._")


def _read_zip(path: Path, wanted: Sequence[str]) -> tuple[dict[str, bytes], set[str]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"This file is not a Catalog Lens model: {path.name} is not a readable zip file.") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > _MAX_ENTRIES:
            raise BundleError(f"This file is not a Catalog Lens model: it holds {len(infos)} files.")
        entries = []
        for info in infos:
            _check_safe_name(info.filename)
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or _is_os_junk(parts):
                continue
            if PurePosixPath(info.filename).suffix.lower() in _CODE_SUFFIXES:
                raise BundleError(
                    f"This model file contains {info.filename!r}, a format that can run code when opened (pickle). "
                    "Catalog Lens models hold only JSON and safetensors; refusing to open it."
                )
            entries.append((parts, info))
        # A model folder zipped by a file manager ("Compress") puts every file under that folder.
        if entries and all(len(p) == 2 for p, _ in entries) and len({p[0] for p, _ in entries}) == 1:
            entries = [(p[1:], i) for p, i in entries]
        members: dict[str, zipfile.ZipInfo] = {}
        for parts, info in entries:
            name = "/".join(parts)
            if name not in MAX_SIZES:
                raise BundleError(
                    f"This file is not a Catalog Lens model: it contains {info.filename!r}, which a model never holds."
                )
            if name in members:
                raise BundleError(f"This model file is damaged: {name} appears twice.")
            if info.flag_bits & 0x1:
                raise BundleError("This model file is password-protected; Catalog Lens cannot open it.")
            if info.file_size > MAX_SIZES[name]:
                raise BundleError(
                    f"This model file is not believable: {name} would unpack to "
                    f"{info.file_size / 2**20:.0f} MB (limit {MAX_SIZES[name] / 2**20:.0f} MB)."
                )
            members[name] = info
        if BUNDLE_JSON not in members:
            raise BundleError("This file is not a Catalog Lens model: bundle.json is missing.")
        out: dict[str, bytes] = {}
        for name in (BUNDLE_JSON, *(n for n in wanted if n != BUNDLE_JSON)):
            if name in members:
                try:
                    if name != BUNDLE_JSON:  # what it declares, before its data is unpacked
                        with zf.open(members[name]) as stream:
                            _check_arrays(name, limits.read_header(stream, members[name].file_size, name), out)
                    # zipfile stops at the declared size (checked above) and verifies the CRC.
                    out[name] = zf.read(members[name])
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                    raise BundleError(f"This model file is damaged: {name} cannot be unpacked ({exc}).") from exc
        return out, set(members)


def _check_arrays(name: str, arrays: dict, read: dict[str, bytes]) -> None:
    """A safetensors member's declared arrays against the model bundle.json describes."""
    bundle = _parse_json(read[BUNDLE_JSON])
    if name == NETWORK_FILE:
        limits.check_network(arrays, bundle.backbone_id, bundle.classes)
        return
    rest = limits.without_novelty(arrays, bundle.backbone_id, len(bundle.classes))
    if bundle.kind == "frozen":
        limits.check_head(rest, bundle.classes)
    elif rest:
        raise BundleError(f"This model file is damaged: its {HEAD_FILE} holds unknown arrays, e.g. {next(iter(rest))[:80]!r}.")


def _read_folder(path: Path, wanted: Sequence[str]) -> tuple[dict[str, bytes], set[str]]:
    # Other files in a folder (.DS_Store, a README) are ignored: only known names are read.
    out, seen = {}, set()
    for name in sorted(MAX_SIZES, key=lambda n: n != BUNDLE_JSON):  # bundle.json first
        f = path / name
        if f.is_symlink():
            raise BundleError(f"This model folder is unsafe: {name} is a link to another place.")
        if not f.is_file():
            continue
        seen.add(name)
        if f.stat().st_size > MAX_SIZES[name]:
            raise BundleError(f"This model folder is not believable: {name} is {f.stat().st_size / 2**20:.0f} MB.")
        if name in wanted or name == BUNDLE_JSON:
            if name != BUNDLE_JSON and BUNDLE_JSON in out:
                with open(f, "rb") as stream:
                    _check_arrays(name, limits.read_header(stream, f.stat().st_size, name), out)
            out[name] = f.read_bytes()
    if BUNDLE_JSON not in seen:
        raise BundleError(f"This folder is not a Catalog Lens model: {BUNDLE_JSON} is missing.")
    return out, seen


def _read_members(path: str | os.PathLike, wanted: Sequence[str]) -> tuple[dict[str, bytes], set[str]]:
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, wanted)
    if not path.is_file():
        raise BundleError(f"There is no model file at {path}.")
    return _read_zip(path, wanted)


def _parse_json(data: bytes) -> ModelBundle:
    return ModelBundle.from_dict(limits.parse_json(data, BUNDLE_JSON))


def _load_safetensors(data: bytes, name: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BundleError(f"This model file is damaged: {name} cannot be read ({exc}).") from exc


def load_bundle(path: str | os.PathLike) -> tuple[ModelBundle, dict[str, np.ndarray]]:
    """Read and validate a bundle (zip or folder); returns its description and head arrays.

    A fine-tuned network's weights are not loaded here (see :func:`load_network_state`).
    Raises :class:`BundleError` (a ``ValueError``) with a sentence for the analyst.
    """
    raw, present = _read_members(path, (BUNDLE_JSON, HEAD_FILE))
    bundle = _parse_json(raw[BUNDLE_JSON])
    if HEAD_FILE in raw:
        arrays = _load_safetensors(raw[HEAD_FILE], HEAD_FILE)
    elif bundle.kind == "frozen":
        raise BundleError(f"This model file is incomplete: {HEAD_FILE} is missing.")
    else:
        arrays = {}
    if bundle.kind == "finetuned" and NETWORK_FILE not in present:
        raise BundleError(f"This model file is incomplete: {NETWORK_FILE} is missing.")
    return bundle, arrays


def load_network_state(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, Any]:
    """The fine-tuned network's ``state_dict`` (torch tensors) from a bundle, via safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw, _ = _read_members(path, (BUNDLE_JSON, NETWORK_FILE))
    _parse_json(raw[BUNDLE_JSON])
    if NETWORK_FILE not in raw:
        raise BundleError(f"This model has no network weights ({NETWORK_FILE} is missing).")
    try:
        state = load(raw[NETWORK_FILE])
    except (SafetensorError, ValueError, TypeError) as exc:
        raise BundleError(f"This model file is damaged: {NETWORK_FILE} cannot be read ({exc}).") from exc
    if not all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point()):
        raise BundleError(f"This model file is damaged: {NETWORK_FILE} holds NaN or infinite weights.")
    return {k: v.to(device) for k, v in state.items()} if device != "cpu" else state


def frozen_head_from_bundle(bundle: ModelBundle, arrays: Mapping[str, np.ndarray]):
    """The fitted scikit-learn head of a frozen-backbone bundle."""
    if bundle.kind != "frozen":
        raise BundleError(f"This is a {bundle.kind} model, not a frozen-backbone one; it has no separate head.")
    try:
        return head_from_arrays(arrays, bundle.classes)
    except ValueError as exc:
        raise BundleError(f"This model file is damaged: {exc}") from exc
