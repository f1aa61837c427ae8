"""Pretrained weights on this computer: find them, download them once, import them, verify them.

Weights live in the standard caches, so files placed there by other tools are found and
files placed there by this module are found by torchvision and timm:
``torch.hub.get_dir()/checkpoints`` for torchvision, the Hugging Face cache for timm, the
installed packages for EfficientNet-Lite0/1/2 (the backbones that work with no download).
A download is checked before it is kept (the file must hold the network's tensors, and
where the publisher gives a SHA-256 prefix in the file name, the file must match it);
a weights file a user imports is read without unpickling anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from core.base.files import atomic_path, atomic_write_text, sha256_file
from core.vision.backbones import Backbone, WeightsSpec, get_backbone

if TYPE_CHECKING:
    import torch


__all__ = [
    "WeightsStatus", "WeightsUnavailable", "cache_dir", "ensure_weights", "import_weights", "read_state_dict",
    "weights_hash", "weights_status",
]

ProgressCallback = Callable[[int, int], None]
_DOWNLOAD_TIMEOUT_S = 30


class WeightsUnavailable(RuntimeError):
    """The weights of a backbone are not on this computer and could not be downloaded.
    ``str()`` is a plain message for the UI saying what to do."""


@dataclass(frozen=True)
class WeightsStatus:
    """Whether a backbone can be used right now, for the Backbone page."""

    backbone_id: str
    available: bool
    path: Path | None
    size_mb: float
    message: str
    official: bool | None = None  # file checksum matches the published one (None: unknown)


def cache_dir() -> Path:
    """Catalog Lens' own cache (measured batch sizes and speeds, imported timm weights,
    remembered file hashes): ``$CATALOG_LENS_CACHE_DIR`` or next to torch's hub cache."""
    env = os.environ.get("CATALOG_LENS_CACHE_DIR")
    if env:
        path = Path(env)
    else:
        import torch

        path = Path(torch.hub.get_dir()) / "catalog_lens"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_file(backbone: Backbone) -> Path | None:
    """The weights file shipped inside an installed package (``weights.location``), or None."""
    try:
        found = [f for f in metadata.files(backbone.weights.location) or () if f.name == backbone.weights.file_name]
    except metadata.PackageNotFoundError:
        return None
    return Path(found[0].locate()) if found else None


def _torchvision_cache_path(backbone: Backbone) -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / backbone.weights.file_name


def _imported_timm_path(backbone: Backbone) -> Path:
    safe = backbone.weights.location.replace("/", "__")
    return cache_dir() / "weights" / f"{safe}.safetensors"


def _hf_cached_file(backbone: Backbone) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(backbone.weights.location, backbone.weights.file_name)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _local_weights(backbone: Backbone) -> Path | None:
    source = backbone.weights.source
    if source == "package":
        path = _package_file(backbone)
    elif source == "torchvision":
        path = _torchvision_cache_path(backbone)
    else:
        path = _hf_cached_file(backbone) or _imported_timm_path(backbone)
    return path if path is not None and path.is_file() else None


def _plain_size(mb: float) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb:.0f} MB"


def _file_hint(w: WeightsSpec) -> str:
    if w.source == "timm-hub":  # "model.safetensors" alone does not say which one
        return f"{w.file_name} from huggingface.co/{w.location}"
    return w.file_name


def _unreachable_message(backbone: Backbone) -> str:
    w = backbone.weights
    return (
        f"{backbone.name} needs a one-time download of {_plain_size(w.size_mb)} from "
        f"{w.host}. This computer could not reach it. Ask IT to allow it, or import the "
        f"weights file ({_file_hint(w)}) under 'Import weights'."
    )


def weights_status(backbone: Backbone | str) -> WeightsStatus:
    """Are the weights on this computer, and if not, what using the backbone takes."""
    backbone = get_backbone(backbone)
    w = backbone.weights
    path = _local_weights(backbone)
    if path is not None:
        official = None
        if w.sha256_prefix:
            official = _file_sha256(path).startswith(w.sha256_prefix)
        where = "comes with the app" if w.source == "package" else f"is saved at {path}"
        note = "" if official is not False else " (an imported file, not the published one)"
        return WeightsStatus(
            backbone.id, True, path, w.size_mb, f"Ready: {backbone.name} {where}{note}.", official
        )
    if w.source == "package":
        message = (
            f"{backbone.name}'s weights come with the app (package {w.location}), but "
            "that package is not installed. Reinstall the app's requirements."
        )
    else:
        message = (
            f"{backbone.name} needs a one-time download of {_plain_size(w.size_mb)} from "
            f"{w.host} the first time it is used, or its weights file ({_file_hint(w)}) "
            "imported under 'Import weights'."
        )
    return WeightsStatus(backbone.id, False, None, w.size_mb, message)


def ensure_weights(backbone_id: str, *, on_progress: ProgressCallback | None = None) -> Path:
    """The local weights file of a backbone, downloading it first if needed.

    ``on_progress(done_bytes, total_bytes)`` is called while downloading. A failed download
    raises :class:`WeightsUnavailable` with a plain message and leaves nothing behind.
    """
    backbone = get_backbone(backbone_id)
    path = _local_weights(backbone)
    if path is not None:
        return path
    source = backbone.weights.source
    if source == "package":
        raise WeightsUnavailable(weights_status(backbone).message)
    try:
        if source == "torchvision":
            return _download_torchvision(backbone, on_progress)
        return _download_hf(backbone, on_progress)
    except WeightsUnavailable:
        raise
    except ValueError as exc:  # reached a server, but what came back is not the weights
        raise WeightsUnavailable(
            f"The download of {backbone.name}'s weights from {backbone.weights.host} did not "
            f"deliver the expected file ({exc}). Try again later, or import the weights "
            f"file ({_file_hint(backbone.weights)}) under 'Import weights'."
        ) from exc
    except Exception as exc:  # network, proxy, disk: the UI needs a sentence, not a trace
        raise WeightsUnavailable(_unreachable_message(backbone)) from exc


def _download_torchvision(backbone: Backbone, on_progress: ProgressCallback | None) -> Path:
    """Download the weights file once, and keep it only if it is what was published: it must
    hold the network's tensors (a proxy's HTML page does not) and, where the file name
    carries the publisher's SHA-256 prefix, match it (a truncated or altered file does not)."""
    target = _torchvision_cache_path(backbone)
    request = urllib.request.Request(backbone.weights.location, headers={"User-Agent": "torch.hub"})
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total or done)
        verify_download(backbone, tmp)
    return target


def verify_download(backbone: Backbone, path: Path) -> None:
    """``ValueError`` saying what is wrong unless ``path`` is the backbone's published weights file."""
    expected = backbone.weights.sha256_prefix
    if expected and not sha256_file(path).startswith(expected):
        raise ValueError(f"its checksum does not match the published one ({expected}…)")
    _check_layout(backbone, read_state_dict(path))


def _download_hf(backbone: Backbone, on_progress: ProgressCallback | None) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs = {}
    if on_progress is not None:
        from tqdm.auto import tqdm

        class _Progress(tqdm):
            def update(self, n=1):
                result = super().update(n)
                if self.total:
                    on_progress(int(self.n), int(self.total))
                return result

        kwargs["tqdm_class"] = _Progress
    path = hf_hub_download(
        backbone.weights.location, backbone.weights.file_name, etag_timeout=10, **kwargs
    )
    return Path(path)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; never unpickles arbitrary objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path.name} is not a PyTorch weights file that can be opened safely ({exc})."
        ) from exc
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path.name} does not hold a table of network weights.")
    return state


def _reference_shapes(backbone: Backbone) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the published weights file of ``backbone`` holds."""
    import torch

    with torch.device("meta"):
        if backbone.weights.source == "timm-hub":
            import timm

            # timm's own hub ids are "timm/<model name>"; default config = published layout
            arch = backbone.weights.name.removeprefix("timm/")
            model = timm.create_model(arch, pretrained=False)
        else:
            model = backbone.full_builder()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_layout(backbone: Backbone, state: dict) -> None:
    """``ValueError`` saying what differs unless ``state`` fits ``backbone`` exactly."""
    ref = _reference_shapes(backbone)
    if backbone.weights.source == "package":  # other key names, same order and shapes
        theirs = [tuple(v.shape) for v in state.values()]
        ours = list(ref.values())
        if len(theirs) != len(ours):
            raise ValueError(
                f"This file holds weights for a different network: {len(theirs)} tensors "
                f"where {backbone.name} has {len(ours)}."
            )
        differ = sum(a != b for a, b in zip(theirs, ours, strict=True))
        if differ:
            raise ValueError(
                f"This file holds weights for a different network: {differ} of {len(ours)} "
                "tensors have other shapes."
            )
        return
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    if missing and len(missing) == len(ref):
        raise ValueError(
            f"This file holds weights for a different network: none of the {len(ref)} "
            f"tensor names of {backbone.name} are in it."
        )
    differ = [k for k in ref if k in state and tuple(state[k].shape) != ref[k]]
    if differ:
        raise ValueError(
            f"This file holds weights for a different network: {len(differ)} of {len(ref)} "
            f"tensors have other shapes (first: {differ[0]})."
        )
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(ref)} tensors are missing (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} are not part of {backbone.name} (first: {extra[0]})")
        raise ValueError(f"This file does not fit {backbone.name}: {'; '.join(parts)}.")


def rename_in_order(state: dict, target: dict) -> dict:
    """Map the efficientnet_pytorch key layout onto timm's, which lists the same tensors in
    the same order with the same shapes (checked by :func:`_check_layout`)."""
    if len(state) != len(target):
        raise ValueError(f"Expected {len(target)} tensors, found {len(state)}.")
    renamed = {}
    for (their_key, tensor), (our_key, ours) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ours.shape:
            raise ValueError(f"{their_key} {tuple(tensor.shape)} does not fit {our_key}.")
        renamed[our_key] = tensor
    return renamed


def import_weights(backbone_id: str, path: str | Path) -> Path:
    """Accept a local weights file (.pth/.pt/.bin or .safetensors) for an offline computer.

    The file must hold exactly the tensors (names and shapes) of the backbone's published
    weights; it is then copied where the loader looks for it and that path is returned.
    A file for another network raises ``ValueError`` saying what did not match.
    """
    backbone = get_backbone(backbone_id)
    source = Path(path)
    if backbone.weights.source == "package":
        raise ValueError(f"{backbone.name} comes with the app; there is nothing to import.")
    if not source.is_file():
        raise ValueError(f"No file found at {source}.")
    if source.suffix.lower() not in {".pth", ".pt", ".bin", ".safetensors"}:
        raise ValueError(
            f"{source.name} is not a weights file: expected a .pth or .safetensors file."
        )
    state = read_state_dict(source)
    _check_layout(backbone, state)
    if backbone.weights.source == "torchvision":
        target = _torchvision_cache_path(backbone)
        with atomic_path(target) as tmp:
            if source.suffix.lower() == ".safetensors":
                import torch

                torch.save(state, tmp)  # torchvision reads .pth only (tensors only: loads with weights_only)
            else:
                shutil.copyfile(source, tmp)
    else:
        from safetensors.torch import save_file

        target = _imported_timm_path(backbone)
        with atomic_path(target) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    _forget_hash(target)
    return target


_HASH_LOCK = threading.Lock()


def _hash_memo_path(path: Path) -> Path:
    """Next to the file in caches we manage (torch hub, ours); elsewhere (the installed
    package, the Hugging Face cache) in our cache, so foreign folders stay untouched."""
    import torch

    ours = (Path(torch.hub.get_dir()) / "checkpoints", cache_dir())
    if any(path.resolve().parent == d.resolve() or d.resolve() in path.resolve().parents
           for d in ours):
        return path.with_name(path.name + ".sha256")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "hashes" / f"{digest}.sha256"


def _forget_hash(path: Path) -> None:
    _hash_memo_path(path).unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered next to it (or in the cache for read-only places)
    together with its size and time, so it is computed once."""
    path = Path(path)
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = _hash_memo_path(path)
    with _HASH_LOCK:
        try:
            saved = json.loads(memo.read_text())
            if saved.get("size") == stamp["size"] and saved.get("mtime_ns") == stamp["mtime_ns"]:
                return saved["sha256"]
        except (OSError, ValueError, KeyError):
            pass
        stamp["sha256"] = sha256_file(path)
        with contextlib.suppress(OSError):  # remembering is an optimisation
            atomic_write_text(memo, json.dumps(stamp))
        return stamp["sha256"]


def weights_hash(backbone: Backbone | str) -> str:
    """sha256 of the backbone's local weights file (part of every feature cache key).
    Raises :class:`WeightsUnavailable` when the file is not on this computer."""
    backbone = get_backbone(backbone)
    path = _local_weights(backbone)
    if path is None:
        raise WeightsUnavailable(weights_status(backbone).message)
    return _file_sha256(path)
