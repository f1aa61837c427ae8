"""What a model file may declare, checked before any of its weights are read.

Model files come from users, and a zip is small while what it declares may be huge: a
1.9 MB zip can hold a 1.9 GB ``network.safetensors`` of zeros. So the sizes are judged
from what the file says about itself before the data is unpacked: the safetensors header
(each array's type, shape and place) must describe exactly the bytes the zip declares, and
the shapes must be the ones the named network and the number of classes call for. Its
JSON is parsed with bounds too (no 5,000-digit numbers, no NaN or infinity, no deep
nesting), so a hostile file gets a plain sentence, never a traceback or minutes of work.
:mod:`core.learning.bundles` calls these checks; they know nothing of zips.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any, BinaryIO

from core.base.problems import InputError
from core.learning import novelty
from core.vision.backbones import get_backbone
from core.vision.networks import build_classifier_model

__all__ = ["MAX_CLASSES", "BundleError", "check_classes", "check_head", "check_network", "parse_json", "read_header"]

MAX_CLASSES = 1000  # a catalog question with more labels than this is not one the app can answer
MAX_DEPTH = 32  # bundle.json nests 4 levels; safetensors headers 2
MAX_DIGITS = 30  # seeds and counts; Python would refuse only past 4,300 digits, with a traceback
MAX_HEADER = 16 << 20  # a safetensors header lists names and shapes: a few kB per network
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class BundleError(InputError):
    """A model file that cannot be used; ``str()`` is a plain sentence for the UI."""


class _Refused(ValueError):
    pass


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json(data: bytes, name: str) -> Any:
    """JSON from a model file, refusing what no Catalog Lens model holds (BundleError)."""

    def whole(text: str) -> int:
        if len(text.lstrip("-")) > MAX_DIGITS:
            raise _Refused(f"a number {len(text.lstrip('-')):,} digits long")
        return int(text)

    def real(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or len(text) > 400:
            raise _Refused(f"the number {text[:20]}…" if len(text) > 20 else f"the number {text}")
        return value

    def constant(text: str) -> float:
        raise _Refused(f"{text}, which is not a number")

    damaged = f"This model file is damaged: {name} "
    try:
        value = json.loads(data.decode("utf-8"), parse_int=whole, parse_float=real, parse_constant=constant)
    except _Refused as exc:
        raise BundleError(damaged + f"holds {exc}; a Catalog Lens model never does.") from None
    except RecursionError:
        raise BundleError(damaged + "is nested thousands of levels deep; a Catalog Lens model never is.") from None
    except (UnicodeDecodeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise BundleError(damaged + f"is not valid JSON ({str(exc)[:200]}).") from None
    if _depth(value) > MAX_DEPTH:
        raise BundleError(damaged + f"is nested more than {MAX_DEPTH} levels deep; a Catalog Lens model never is.")
    return value


def check_classes(classes: list) -> None:
    if len(classes) > MAX_CLASSES:
        raise BundleError(
            f"This model file is not believable: it names {len(classes):,} classes (this app handles up to "
            f"{MAX_CLASSES:,})."
        )


def read_header(stream: BinaryIO, size: int, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each array's (type, shape) from the safetensors header at the start of ``stream``
    (``size`` bytes in all), reading only the header; the declared places of the arrays
    must cover exactly the rest of the file."""
    damaged = f"This model file is damaged: {name} cannot be read"
    head = stream.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(MAX_HEADER, size - 8):
        raise BundleError(f"{damaged} (its header is missing or claims {max(n, 0):,} bytes).")
    header = parse_json(stream.read(n), f"{name} cannot be read: its header")
    if not isinstance(header, dict) or not isinstance(header.pop("__metadata__", {}), dict):
        raise BundleError(f"{damaged} (its header is not a list of arrays).")
    arrays, spans = {}, []
    for key, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES
        shape, places = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ints = (
            isinstance(shape, list) and len(shape) <= 8 and isinstance(places, list) and len(places) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *places])
        )
        if not ints or places[1] - places[0] != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
            raise BundleError(f"{damaged} (the array {str(key)[:80]!r} is described wrongly).")
        arrays[key] = (info["dtype"], tuple(shape))
        spans.append(tuple(places))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise BundleError(f"{damaged} (its arrays overlap or leave gaps).")
        end = stop
    if end != size - 8 - n:
        raise BundleError(
            f"{damaged}: its header describes {end:,} bytes of weights but the file holds {max(size - 8 - n, 0):,}."
        )
    return arrays


@functools.lru_cache(maxsize=16)
def _network_shapes(backbone_id: str, n_classes: int) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = build_classifier_model(backbone_id, n_classes, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(found: Mapping[str, tuple], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and tuple(found[k][1]) != tuple(expected[k])]
    if missing or extra or wrong:
        k = (missing or extra or wrong)[0]
        detail = (
            f"{len(missing)} arrays missing, e.g. {k!r}" if missing else f"{len(extra)} unknown arrays, e.g. {k[:80]!r}"
            if extra else f"{k!r} has the shape {list(found[k][1])}, expected {list(expected[k])}"
        )
        raise BundleError(f"This model file does not fit {what} ({detail}); it is damaged or made for another network.")


def check_network(arrays: Mapping[str, tuple], backbone_id: str, classes: list) -> None:
    """The fine-tuned network's arrays must be exactly those of ``backbone_id`` with these classes."""
    try:
        get_backbone(backbone_id)
    except ValueError:
        raise BundleError(f"This model was made for the network {backbone_id!r}, which this app does not have.") from None
    _compare(arrays, _network_shapes(backbone_id, len(classes)), f"a fine-tuned {backbone_id} with {len(classes)} labels")


def without_novelty(arrays: Mapping[str, tuple], backbone_id: str, n_classes: int) -> dict[str, tuple]:
    """The head member's arrays other than the optional "unlike the training photos" part
    (:mod:`core.learning.novelty`), which must be exactly its three arrays: at most
    ``MAX_REFERENCE`` training photos' features of the backbone's width, one limit, one k;
    and optionally the training photos' classes (one each) and one limit per class of the model."""
    part = {k: v for k, v in arrays.items() if k.startswith("novelty.")}
    if part:
        try:
            width = get_backbone(backbone_id).feature_dim
        except ValueError:
            raise BundleError(f"This model was made for the network {backbone_id!r}, which this app does not have.") from None
        shape = tuple(part.get("novelty.reference", ("", ()))[1])
        if len(shape) != 2 or not 0 < shape[0] <= novelty.MAX_REFERENCE:
            shape = (-1, -1)
        expected = {"novelty.reference": (shape[0], width), "novelty.threshold": (1,), "novelty.k": (1,)}
        if any(key in part for key in novelty.CLASS_KEYS):
            expected |= {"novelty.labels": (shape[0],), "novelty.class_threshold": (n_classes,)}
        _compare(part, expected, f"the training photos' features of {backbone_id}")
    return {k: v for k, v in arrays.items() if k not in part}


def check_head(arrays: Mapping[str, tuple], classes: list) -> None:
    """A frozen head's arrays: the known seven, with shapes that fit each other and the classes."""
    d = arrays.get("scaler.mean", ("", (0,)))[1]
    d = d[0] if len(d) == 1 else -1
    rows = 1 if len(classes) == 2 else len(classes)
    expected = {
        "scaler.mean": (d,), "scaler.scale": (d,), "scaler.var": (d,), "logreg.coef": (rows, d),
        "logreg.intercept": (rows,), "logreg.C": (1,), "n_samples_seen": (1,),
    }
    _compare(arrays, expected, f"a frozen head for {len(classes)} labels")
