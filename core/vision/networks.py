"""Pretrained networks ready to use: feature extractors, fine-tunable classifiers, transforms.

Builds the architecture from the registry (:mod:`core.vision.backbones`), loads the local
weights (:mod:`core.vision.weights`) and gives back what the rest of the app needs: a
frozen feature extractor (BatchNorm folded, padding made static, on the device, cached in the process), the
starting point for fine-tuning (features + a new head), the published ImageNet network
and the evaluation transform made by the library that published the weights.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.vision.backbones import Backbone, features_of, get_backbone
from core.vision.device import pick_device
from core.vision.fuse import for_inference
from core.vision.weights import ProgressCallback, ensure_weights, read_state_dict, rename_in_order

if TYPE_CHECKING:
    import torch
    from torch import nn


__all__ = [
    "build_classifier_model", "build_transform", "load_feature_extractor", "load_imagenet_model",
    "load_pretrained",
]


def build_transform(backbone: Backbone | str) -> Callable:
    """PIL RGB image → normalised float tensor (3, crop, crop), made by the library that
    published the weights from the weights' own configuration."""
    backbone = get_backbone(backbone)
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


def load_pretrained(backbone: Backbone | str, on_progress: ProgressCallback | None = None) -> nn.Module:
    """The published network (classifier included) with its pretrained weights, on the CPU."""
    backbone = get_backbone(backbone)
    path = ensure_weights(backbone.id, on_progress=on_progress)
    source = backbone.weights.source
    if source == "timm-hub":  # timm loads the file itself, adapting it (e.g. to 224 px)
        return backbone.full_builder(file=str(path))
    model = backbone.full_builder()
    state = read_state_dict(path)
    if source == "package":
        state = rename_in_order(state, model.state_dict())
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
    layers into the convolutions before them and makes "same" padding static
    (:func:`core.vision.fuse.for_inference`): the same features, faster.

    A small in-process cache keeps the two most recent extractors, so repeated calls cost
    nothing; callers must not modify the returned module.
    """
    backbone = get_backbone(backbone_id)
    dev = pick_device(device)
    path = ensure_weights(backbone_id, on_progress=on_progress)
    stat = path.stat()
    key = (backbone_id, str(dev), str(path), stat.st_size, stat.st_mtime_ns, fold)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
    import torch

    model = features_of(backbone, load_pretrained(backbone, None)).eval()
    size = backbone.input_size
    if fold:
        model = for_inference(model, torch.randn(2, 3, size, size), static_padding=dev.type == "cpu")
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

    backbone = get_backbone(backbone_id)
    if backbone.params_full is None:
        raise ValueError(f"{backbone.name} was published without an ImageNet classifier.")
    model = load_pretrained(backbone, None).eval().to(pick_device(device))
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
        features = features_of(backbone, load_pretrained(backbone, on_progress))
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
