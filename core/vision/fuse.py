"""Inference-only rewrites of a frozen network that compute the same output faster:
:func:`for_inference` applies both below.

**Folding BatchNorm layers into the convolutions before them.**

A frozen backbone in eval mode applies each BatchNorm as a fixed scale and shift, which
can be folded into the weights of the convolution that feeds it: the same features
(largest difference 8.8e-6 on values up to 5.3) at 1.67x the photos per second (EfficientNet-
Lite0 on a 2-core CPU, batch 4: 123.8 vs 74.1; ``benchmarks/bench_extract.py`` row (f)). Which convolution feeds which BatchNorm is read from one real forward
pass, not from layer names, and the folded copy is only used when its output matches the
original's on that pass.

**Static "same" padding.** Networks ported from TensorFlow (the EfficientNet-Lite family) pad
the input of every strided convolution asymmetrically, one row and column more at the bottom
and right, and timm does it with a padded copy of the activations on every call: 17 % of
Lite0's time on a 2-core CPU. For the fixed input size the network always runs at, such a
convolution equals one with symmetric padding and a kernel one row and column larger whose
first row and column are zero (window ``j`` then starts one pixel earlier on a zero weight):
the few numbers of the kernel are padded instead of the activations. Lite0 on 128 catalog
photos, batch 8, 2-core CPU, one run: 104.8 → 146.0 photos/s, outputs identical to the last
bit. The layer keeps its parameters (it changes class in place), so a copy saves and loads
as the original. An input of another size takes the original path. (In a network being
fine-tuned it trains the same, but gave no measurable gain: the backward pass dominates.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["fold_batch_norms", "for_inference", "frozen_parts_for_inference", "plan_static_padding",
           "static_same_padding"]

MAX_RELATIVE_ERROR = 1e-4  # folded vs original output, relative to the output's largest value


def _replacement(bn: nn.Module) -> nn.Module:
    """What is left of a BatchNorm once folded: nothing, or timm's activation after it."""
    from torch import nn

    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):  # timm's BatchNormAct2d
        return nn.Sequential(drop, act)
    return nn.Identity()


def fold_batch_norms(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` with every BatchNorm that directly consumes a
    convolution's output folded into that convolution, and how many were folded.

    ``probe`` is one input batch. Returns ``(model, 0)`` unchanged when nothing can be folded
    or when the folded copy's output differs from the original's by more than
    ``MAX_RELATIVE_ERROR`` (then some layer is used in a way this pass did not see).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("Only a model in eval mode can have its BatchNorm layers folded.")
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    # The tensors are kept, so no object id is reused during the pass.
    reference = _traced_pass(model, probe, (nn.Conv2d, nn.BatchNorm2d),
                             lambda name, module, x, out: calls.append((name, module, x, out)))
    pairs = [(conv_name, bn_name) for (conv_name, conv, _, out), (bn_name, bn, bn_in, _) in zip(calls, calls[1:])
             if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn_in is out
             and bn.track_running_stats and bn.running_mean is not None]
    used = [name for name, *_ in calls]
    # A layer called more than once (shared weights) is left alone.
    pairs = [(c, b) for c, b in pairs if used.count(c) == 1 and used.count(b) == 1]
    if not pairs:
        return model, 0
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        folded.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        folded.set_submodule(bn_name, _replacement(bn))
    if not _same_output(folded, probe, reference):
        return model, 0
    return folded.eval(), len(pairs)


def _traced_pass(model: nn.Module, probe: torch.Tensor, kinds: tuple, on_call) -> torch.Tensor:
    """``model``'s output on ``probe`` (inference mode), calling ``on_call(name, module, input,
    output)`` for every call of a submodule of one of ``kinds`` on the way."""
    import torch

    def record(name):
        return lambda module, inputs, output: on_call(name, module, inputs[0], output)

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, kinds)]
    try:
        with torch.inference_mode():
            return model(probe)
    finally:
        for hook in hooks:
            hook.remove()


def _same_output(rewritten: nn.Module, probe: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether ``rewritten`` gives ``reference`` on ``probe``, within ``MAX_RELATIVE_ERROR``."""
    import torch

    with torch.inference_mode():
        output = rewritten(probe)
    scale = max(float(reference.abs().max()), 1e-6)
    return output.shape == reference.shape and float((output - reference).abs().max()) <= MAX_RELATIVE_ERROR * scale


def for_inference(model: nn.Module, probe: torch.Tensor, *, static_padding: bool = True) -> nn.Module:
    """A faster copy of the eval-mode ``model`` for inputs shaped like ``probe`` (one batch):
    BatchNorm folded (:func:`fold_batch_norms`), then "same" padding made static
    (:func:`static_same_padding`) unless ``static_padding`` is False. Each step is kept only
    when its output matches.

    Callers pass ``static_padding=False`` for a GPU: the gain was measured on CPUs, where the
    padded copy is costly; on a GPU the copy is cheap and cuDNN's depthwise kernels are tuned
    for 3x3 and 5x5, not the 4x4 and 6x6 this makes (not measured there)."""
    fast, folded = fold_batch_norms(model, probe)
    if static_padding:
        if folded:  # already a copy of its own: planned in place, not copied a second time
            plan_static_padding(fast.requires_grad_(False), probe)
        else:
            fast, _ = static_same_padding(fast, probe)
    return fast


def _same_pad(n: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding before and after one dimension of size ``n``."""
    total = max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


@functools.cache
def _static_same_class():
    import torch.nn.functional as F
    from timm.layers.conv2d_same import Conv2dSame

    class StaticSameConv2d(Conv2dSame):
        """timm's ``Conv2dSame`` planned for one input size by :func:`plan_static_padding` (see the
        module's notes). Its parameters are the original ones, unchanged: it trains, and saves
        under the same names, as the layer it was; other input sizes take the original path."""

        planned: tuple[int, int] = (-1, -1)  # the input size
        grow: tuple[int, int] = (0, 0)  # rows / columns of zeros in front of the kernel
        pad: tuple[int, int] = (0, 0)  # symmetric padding

        def forward(self, x):
            if tuple(x.shape[-2:]) != self.planned:
                return super().forward(x)
            weight = self.weight
            if any(self.grow):  # a frozen layer's kernel is padded once (ONNX export needs it so)
                frozen = getattr(self, "padded_weight", None)
                weight = frozen if frozen is not None and not weight.requires_grad else self.padded(weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.pad, self.dilation, self.groups)

        def padded(self, weight):
            return F.pad(weight, (self.grow[1], 0, self.grow[0], 0))

    return StaticSameConv2d


def plan_static_padding(model: nn.Module, probe: torch.Tensor) -> int:
    """Make ``model``'s timm ``Conv2dSame`` layers pad statically for the input size each sees on
    ``probe``, in place (parameters, gradients and state dict unchanged), and say how many; none
    when the output on ``probe`` would change by more than ``MAX_RELATIVE_ERROR`` (on a CPU it is
    the same to the last bit). Works on a model being trained: the check runs in eval mode."""
    from timm.layers.conv2d_same import Conv2dSame

    with _eval_mode(model):  # the probe moves no BatchNorm statistics
        sizes: dict[str, list[tuple[int, int]]] = {}
        reference = _traced_pass(model, probe, (Conv2dSame,),
                                 lambda name, module, x, out: sizes.setdefault(name, []).append(tuple(x.shape[-2:])))
        planned = {name: seen[0] for name, seen in sizes.items()  # shared layers are left alone
                   if len(seen) == 1 and tuple(model.get_submodule(name).dilation) == (1, 1)}
        cls = _static_same_class()
        for name, size in planned.items():
            conv = model.get_submodule(name)
            (top, bottom), (left, right) = (_same_pad(n, k, s, 1) for n, k, s in zip(size, conv.kernel_size, conv.stride,
                                                                                      strict=True))
            conv.__class__ = cls
            conv.planned, conv.grow, conv.pad = tuple(size), (bottom - top, right - left), (bottom, right)
            if any(conv.grow) and not conv.weight.requires_grad:  # not in the state dict
                conv.register_buffer("padded_weight", conv.padded(conv.weight.detach()), persistent=False)
        if planned and not _same_output(model, probe, reference):
            for name in planned:
                conv = model.get_submodule(name)
                conv.__class__ = Conv2dSame
                conv._buffers.pop("padded_weight", None)
            return 0
        return len(planned)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every submodule's own mode is back afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, mode in modes.items():
            m.train(mode)


def static_same_padding(model: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` for inference (no parameter asks for gradients) with
    :func:`plan_static_padding` applied, and how many layers it changed; ``(model, 0)`` itself
    when none."""
    if model.training:
        raise ValueError("Only a model in eval mode can have its padding made static.")
    static = copy.deepcopy(model).requires_grad_(False)
    n = plan_static_padding(static, probe)
    return (static, n) if n else (model, 0)


# --------------------------------------------------------------------------- while training


def _runs_as_in_eval(module: nn.Module) -> bool:
    """Whether ``module`` computes what it computes in eval mode: no BatchNorm updating its
    statistics, no dropout or drop-path active."""
    from torch import nn

    for m in module.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            return False
        rate = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if rate:
            return False
    return True


def _frozen_parts(model: nn.Module) -> list[str]:
    """The largest submodules of ``model`` that do not train now: parameters all frozen, and
    computing as in eval mode."""
    found: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if name and params and not any(p.requires_grad for p in params) and _runs_as_in_eval(module):
            found.append(name)
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return found


@contextlib.contextmanager
def frozen_parts_for_inference(model: nn.Module, probe: torch.Tensor, *, static_padding: bool = True) -> Iterator[int]:
    """While training ``model``, its parts that do not train (the whole backbone while only the
    head trains, the first stages while the top trains) run as :func:`for_inference` copies:
    the same activations, faster; no gradient goes through them, so the training is the same.
    The originals are back when the block ends, for saving and for the next epoch's choice of
    what trains. Yields how many parts were swapped. ``probe`` is one input batch (its shape
    reaches each part as in training)."""
    import torch

    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().clone()
        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in _frozen_parts(model)]
    try:
        with _eval_mode(model), torch.inference_mode():  # the probe moves no BatchNorm statistics
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    originals: dict[str, nn.Module] = {}
    try:
        for name, x in inputs.items():
            part = model.get_submodule(name)
            with _eval_mode(part):
                fast = for_inference(part, x, static_padding=static_padding)
            if fast is not part:
                originals[name] = part
                model.set_submodule(name, fast.requires_grad_(False).to(memory_format=torch.channels_last))
        yield len(originals)
    finally:
        for name, part in originals.items():
            model.set_submodule(name, part)
