"""Inference rewrites (BatchNorm folded, static padding): same features on real photos, less work, never wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.vision import backbones
from core.vision import networks as nw
from core.vision.fuse import fold_batch_norms, for_inference, static_same_padding


def _photos(n: int = 6) -> torch.Tensor:
    from skimage import data

    transform = nw.build_transform("efficientnet_lite0")
    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return torch.stack([transform(Image.fromarray(arrays[i % 4]).convert("RGB").rotate(7 * i)) for i in range(n)])


def test_lite0_features_are_the_same_after_folding():
    backbone = backbones.get_backbone("efficientnet_lite0")
    plain = backbones.features_of(backbone, nw.load_pretrained(backbone)).eval()
    folded, n = fold_batch_norms(plain, torch.randn(2, 3, 224, 224))
    assert n == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = _photos()
    with torch.inference_mode():
        a, b = plain(x), folded(x)
    assert a.shape == b.shape == (6, 1280)
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


def test_the_app_extractor_is_folded():
    model, _ = nw.load_feature_extractor("efficientnet_lite0", device="cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class _SharedConv(nn.Module):
    """One convolution used twice, with a BatchNorm after each use: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


def _trained_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, as a trained network has."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 16, 16) * 3 + 1)
    return model.eval()


@pytest.mark.parametrize("make, expected", [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)), 2),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), 0),  # BN not right after the conv
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), 0),  # BN before the conv
    (_SharedConv, 0),
])
def test_only_a_batchnorm_fed_by_a_convolution_is_folded(make, expected):
    model = _trained_stats(make())
    x = torch.randn(2, 3, 16, 16)
    folded, n = fold_batch_norms(model, x)
    assert n == expected
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train(), torch.randn(1, 3, 4, 4))


# --------------------------------------------------------------------------- static "same" padding


def _pads_each_call(module: nn.Module) -> bool:
    """timm's layer as published, which pads a copy of its input on every call."""
    from timm.layers.conv2d_same import Conv2dSame

    return type(module) is Conv2dSame


@pytest.mark.parametrize("size", [224, 240, 260, 17, 18])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (5, 2), (3, 1), (4, 2), (1, 2)])
def test_static_same_padding_computes_what_timm_pads_on_every_call(size, kernel, stride):
    """Every kernel/stride/size case, odd and even (asymmetric and symmetric padding): the same
    output at the planned size, and at other sizes (the original path)."""
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(size * kernel)
    model = nn.Sequential(Conv2dSame(3, 8, kernel, stride), nn.ReLU(), Conv2dSame(8, 8, kernel, stride, groups=8)).eval().requires_grad_(False)
    x = torch.randn(2, 3, size, size)
    static, n = static_same_padding(model, x)
    assert n == 2 and not any(_pads_each_call(m) for m in static.modules())
    assert not any(p.requires_grad for p in static.parameters())  # a frozen layer stays frozen
    with torch.inference_mode():
        for probe in (x, torch.randn(1, 3, size + 1, size + 3)):
            assert torch.allclose(static(probe), model(probe), atol=1e-6)


@pytest.mark.parametrize("backbone_id", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_the_lite_networks_give_the_same_features_with_static_padding(backbone_id):
    from timm.layers.conv2d_same import Conv2dSame

    backbone = backbones.get_backbone(backbone_id)
    size = backbone.input_size
    plain = backbones.features_of(backbone, nw.load_pretrained(backbone)).eval()
    fast = for_inference(plain, torch.randn(2, 3, size, size))
    assert sum(isinstance(m, Conv2dSame) for m in plain.modules()) == 5
    assert not any(_pads_each_call(m) or isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = nn.functional.interpolate(_photos(4), size=(size, size), mode="bilinear")
    with torch.inference_mode():
        a, b = plain(x), fast(x)
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


def test_the_app_extractor_pads_statically():

    model, _ = nw.load_feature_extractor("efficientnet_lite0", device="cpu")
    assert not any(_pads_each_call(m) for m in model.modules())


def _top_trains(top: tuple[str, ...]) -> nn.Module:
    """Lite0 with a new head, in training mode, where only parameters named from ``top`` train
    and BatchNorm keeps its statistics, as fine-tuning runs by default."""
    torch.manual_seed(0)
    model = nw.build_classifier_model("efficientnet_lite0", 2)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(top))
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def _two_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> list[float]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _trained_alike(a: tuple[list[float], dict], b: tuple[list[float], dict]) -> bool:
    (losses_a, state_a), (losses_b, state_b) = a, b
    return (np.allclose(losses_a, losses_b, atol=1e-5) and losses_a[1] < losses_a[0]
            and [(k, v.shape) for k, v in state_a.items()] == [(k, v.shape) for k, v in state_b.items()]
            and all(torch.allclose(state_a[k], state_b[k], atol=1e-5) for k in state_a))


def test_a_network_trains_the_same_with_its_padding_planned():
    """Planning changes no parameter: a planned network trains the same (losses and weights after
    two steps; the strided 5x5 layer of blocks.5 trains) and has the same state dict names and shapes."""
    import copy

    from core.vision.fuse import plan_static_padding

    base = _top_trains(("head.", "features.model.blocks.5", "features.model.blocks.6", "features.model.conv_head"))
    x, y = _photos(4), torch.tensor([0, 1, 0, 1])
    plain, planned = copy.deepcopy(base), copy.deepcopy(base)
    assert plan_static_padding(planned, x[:2]) == 5 and planned.training
    runs = [(_two_steps(model, x, y, lr=0.05), model.state_dict()) for model in (plain, planned)]
    assert _trained_alike(*runs)
    changed = "features.model.blocks.5.0.conv_dw.weight"
    assert not torch.equal(runs[1][1][changed], base.state_dict()[changed])  # a planned layer did train


def test_training_with_the_frozen_parts_swapped_is_the_same_training():
    """The parts that do not train run as inference copies while the top trains: the same loss
    and the same weights after two steps, and the original modules (and state dict) are back."""
    import copy

    from core.vision.fuse import frozen_parts_for_inference

    base = _top_trains(("head.", "features.model.blocks.6", "features.model.conv_head", "features.model.bn2"))
    x, y = _photos(4), torch.tensor([0, 1, 0, 1])
    plain, model = copy.deepcopy(base), copy.deepcopy(base)
    modules_before, trainable = dict(model.named_modules()), [p for p in model.parameters() if p.requires_grad]
    with frozen_parts_for_inference(model, x[:2]) as swapped:
        # no gradient is computed for the copies (backward would run through the whole network)
        assert [p for p in model.parameters() if p.requires_grad] == trainable
        fast_losses = _two_steps(model, x, y, lr=0.5)
    assert swapped >= 3 and dict(model.named_modules()) == modules_before
    assert _trained_alike((_two_steps(plain, x, y, lr=0.5), plain.state_dict()), (fast_losses, model.state_dict()))
