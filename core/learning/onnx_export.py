"""Models that run outside the app: a model bundle exported as one ONNX file.

The file runs anywhere ONNX Runtime does (Spark, a web service, a phone), without torch and
without this app. It takes ``images``: a float32 batch of photos already prepared the way
the bundle says (N, 3, crop, crop; resized, cropped, scaled to 0-1 and normalised), and gives
``probabilities``: one row per photo, one column per class, in the order of the ``classes``
metadata entry. ``preprocessing`` (JSON: resize_size, crop_size, mean, std, interpolation,
crop_mode) is the bundle's own record, so whoever prepares the photos knows exactly how.

* A quick (frozen-backbone) model: the backbone (BatchNorm folded, as the app runs it), then
  the scaler and the logistic head folded into one final linear layer, then softmax.
* A fine-tuned model: the network as trained, its outputs put in class order, then softmax.

The probabilities are the app's (:class:`~core.learning.predictor.Predictor`) to a few 1e-6;
the decision threshold is not applied (``threshold`` is in the metadata for two-class models).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.base.files import atomic_path
from core.learning import bundles
from core.learning.predictor import check_backbone, check_weights, load_network
from core.vision import backbones, networks
from core.vision.fuse import for_inference

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FORMATS", "export_model", "folded_head", "onnx_metadata"]

FORMATS = ("onnx",)
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


def folded_head(head, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The weights and bias of one linear layer whose softmax gives ``head.predict_proba``
    (a fitted scaler + logistic regression), rows in ``classes`` order.

    Scaling folds into the weights (``(x - m) / s @ W.T == x @ (W / s).T - W @ (m / s)``); a
    two-class logistic regression is a softmax over the logits ``[0, z]``.
    """
    scaler, logreg = head.named_steps["scale"], head.named_steps["logreg"]
    coef, intercept = np.asarray(logreg.coef_, dtype=np.float64), np.asarray(logreg.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    row = {str(c): j for j, c in enumerate(logreg.classes_)}
    order = [row[c] for c in classes]
    return weight[order], bias[order]


def _probabilities_module(body: nn.Module, order: list[int] | None) -> nn.Module:
    from torch import nn

    class Probabilities(nn.Module):
        """``body``'s logits, columns put in class order, as probabilities."""

        def __init__(self):
            super().__init__()
            self.body = body
            self.order = order

        def forward(self, images):
            logits = self.body(images)
            if self.order is not None:
                logits = logits[:, self.order]
            return logits.softmax(dim=1)

    return Probabilities().eval()


def _network(bundle_path: Path, bundle: bundles.ModelBundle, arrays) -> nn.Module:
    """The whole model, photos in, probabilities in ``bundle.classes`` order out (CPU, eval)."""
    import torch
    from torch import nn

    if bundle.kind == "frozen":
        check_weights(bundle)
        weight, bias = folded_head(bundles.frozen_head_from_bundle(bundle, arrays), list(bundle.classes))
        backbone = backbones.get_backbone(bundle.backbone_id)
        features = backbones.features_of(backbone, networks.load_pretrained(backbone)).eval()
        size = backbone.input_size
        features = for_inference(features, torch.randn(2, 3, size, size))  # as the app extracts
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
        return _probabilities_module(nn.Sequential(features, linear), None)
    network = load_network(bundle_path, bundle)
    trained_order = sorted(bundle.classes)  # the fine-tuned head's outputs follow the sorted names
    return _probabilities_module(network, [trained_order.index(c) for c in bundle.classes])


def onnx_metadata(bundle: bundles.ModelBundle) -> dict[str, str]:
    """The metadata entries an exported file carries (all values are strings, as ONNX wants)."""
    meta = {
        "classes": json.dumps(list(bundle.classes)),
        "preprocessing": json.dumps(bundle.preprocessing),
        "model_id": bundle.id,
        "backbone": bundle.backbone_id,
        "kind": bundle.kind,
        "input": f"{INPUT_NAME}: float32 (N, 3, H, W), photos prepared as 'preprocessing' says",
        "output": f"{OUTPUT_NAME}: float32 (N, classes), in the order of 'classes'",
    }
    if bundle.positive is not None:
        meta["positive"] = bundle.positive
        meta["threshold"] = json.dumps(bundle.threshold)
    return meta


def export_model(bundle_path: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "onnx") -> Path:
    """Write the model of ``bundle_path`` as an ONNX file at ``out`` (see the module notes).

    Raises :class:`~core.learning.bundles.BundleError` for a file that is not a usable model,
    and InputError (with the fix) for a quick model whose backbone weights are not here.
    """
    import onnx
    import torch

    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    bundle_path, out = Path(bundle_path), Path(out)
    bundle, arrays = bundles.load_bundle(bundle_path)
    check_backbone(bundle)
    model = _network(bundle_path, bundle, arrays)
    crop = int(bundle.preprocessing.get("crop_size") or backbones.get_backbone(bundle.backbone_id).input_size)
    example = torch.zeros(2, 3, crop, crop)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
        )
    proto = program.model_proto
    for key, value in onnx_metadata(bundle).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return out
