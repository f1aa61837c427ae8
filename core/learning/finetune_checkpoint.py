"""A fine-tuning run's checkpoint: everything needed to continue it exactly, in one file.

After every completed epoch :func:`core.learning.finetune.finetune` writes
``checkpoint_dir/finetune-resume.safetensors`` atomically (:mod:`core.base.files`), so a
run killed at any moment leaves the last complete epoch or the one before, never half a
file. Tensors are stored with safetensors and everything else as one JSON document in
the same file's header: no pickle anywhere, and one rename makes both halves visible
together, so they can never disagree.

Tensors (names are prefixes plus the usual keys):

- ``model/…``        the network as it is at the end of the epoch
- ``best/…``         the best weights so far (left out when they are the model's)
- ``optimizer/P/…``  AdamW's per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``)
- ``best_eval/…``    the best model's validation ``proba`` and ``targets``
- ``rng/torch``, ``rng/cuda``  the torch random generators of this process

JSON (header key ``state``): the epoch to run next, history, bad-epochs counter, batch
size, photos that failed, starting validation scores, best loss/epoch and validation ids,
seconds spent, the optimizer's parameter groups (learning rates), the scheduler's step,
the GradScaler's state, and python's and numpy's random states. The shuffle needs nothing:
each epoch's order and augmentation derive from ``(seed, epoch)``
(:class:`core.vision.photos.EpochShuffle`).

The header also holds a fingerprint of what the run was asked (:func:`request_fingerprint`);
a checkpoint is only used by a run asked exactly the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.base.files import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import nn

    from core.learning.finetune_config import FinetuneConfig


__all__ = ["CHECKPOINT_FILE", "Checkpoint", "load_checkpoint", "remove_checkpoint", "request_fingerprint",
           "restore_rng", "save_checkpoint"]

CHECKPOINT_FILE = "finetune-resume.safetensors"
FORMAT = "catalog-lens finetune checkpoint 1"


@dataclass
class Checkpoint:
    """A checkpoint read back. ``progress`` is the JSON document :func:`save_checkpoint` was
    given; ``best_state`` is None when the best weights are ``model``'s."""

    progress: dict[str, Any]
    model: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor] | None
    best_eval: dict[str, Any] | None
    optimizer: dict[str, Any]  # an optimizer state_dict
    scheduler_step: int
    scaler: dict[str, Any] | None
    rng: dict[str, Any]


def _array_digest(arrays: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[key]))
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def request_fingerprint(
    *,
    backbone_id: str,
    classes: Sequence[str],
    train_items: Sequence[tuple[str, Any, int]],
    val_items: Sequence[tuple[str, Any, int]],
    config: FinetuneConfig,
    head_arrays: Mapping[str, Any] | None,
    head_classes: Sequence[str] | None,
    device_type: str,
) -> str:
    """A hash of everything that decides a run: the backbone, the classes, the training and
    validation photos (ids and labels, in order), the settings, the starting head and the
    kind of device. Paths are left out: a project folder that moved holds the same photos."""
    request = {
        "backbone": backbone_id,
        "classes": list(classes),
        "train": [[str(i), int(t)] for i, _, t in train_items],
        "val": [[str(i), int(t)] for i, _, t in val_items],
        "config": dataclasses.asdict(config),
        "head": None if head_arrays is None else _array_digest(head_arrays),
        "head_classes": None if head_classes is None else [str(c) for c in head_classes],
        "device": device_type,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def save_checkpoint(
    folder: Path,
    *,
    fingerprint: str,
    progress: Mapping[str, Any],
    model: nn.Module,
    best_state: Mapping[str, torch.Tensor] | None,
    best_eval: Mapping[str, Any] | None,
    optimizer,
    scheduler_step: int,
    scaler=None,
    device: torch.device,
) -> Path:
    """Write the run's state as it is now (the end of an epoch) to ``folder``, atomically,
    with this process's random states. ``progress`` must be JSON-able; ``best_state``
    None means the best weights are the model's."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"model/{k}": _cpu(v) for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best/{k}": _cpu(v) for k, v in best_state.items()})
    opt = optimizer.state_dict()
    opt_extra: dict[str, dict[str, Any]] = {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = _cpu(value)
            else:
                opt_extra.setdefault(str(index), {})[name] = value
    best = None
    if best_eval is not None:
        tensors["best_eval/proba"] = torch.from_numpy(np.ascontiguousarray(best_eval["proba"]))
        tensors["best_eval/targets"] = torch.from_numpy(np.ascontiguousarray(best_eval["targets"], dtype=np.int64))
        best = {k: best_eval[k] for k in ("ids", "index", "loss", "accuracy", "n")}
    tensors["rng/torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    state = {
        "progress": dict(progress),
        "best_eval": best,
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_extra},
        "scheduler_step": int(scheduler_step),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
    }
    target = Path(folder) / CHECKPOINT_FILE
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "fingerprint": fingerprint,
                                               "state": json.dumps(state)})
    return target


def load_checkpoint(folder: Path, fingerprint: str) -> tuple[Checkpoint | None, str | None]:
    """The checkpoint in ``folder`` if it was written by a run asked ``fingerprint``, else
    None and, when there was a file, a plain sentence saying why it is not used."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None, f"The saved fine-tuning state in {path} is of another kind; started over."
            if meta.get("fingerprint") != fingerprint:
                return None, ("The saved fine-tuning state was for other photos, labels or settings; "
                              "started over.")
            state = json.loads(meta["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        return None, f"The saved fine-tuning state in {path} could not be read ({exc}); started over."

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in part("optimizer/").items():
        index, name = key.split("/", 1)
        opt_state.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer"]["state"].items():
        opt_state.setdefault(int(index), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["optimizer"]["param_groups"]]
    best_eval = state["best_eval"]
    if best_eval is not None:
        best_eval = dict(best_eval, proba=tensors["best_eval/proba"].numpy(),
                         targets=tensors["best_eval/targets"].numpy())
    return Checkpoint(
        progress=state["progress"],
        model=part("model/"),
        best_state=part("best/") or None,
        best_eval=best_eval,
        optimizer={"state": opt_state, "param_groups": groups},
        scheduler_step=state["scheduler_step"],
        scaler=state["scaler"],
        rng={"torch": tensors["rng/torch"], "cuda": tensors.get("rng/cuda"), **state["rng"]},
    ), None


def restore_rng(checkpoint: Checkpoint, device: torch.device) -> None:
    """Put this process's random generators where the checkpoint's run had them."""
    import torch

    torch.set_rng_state(checkpoint.rng["torch"])
    if device.type == "cuda" and checkpoint.rng["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint.rng["cuda"], device)
    version, internal, gauss = checkpoint.rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = checkpoint.rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def remove_checkpoint(folder: Path) -> None:
    """Forget a finished run's checkpoint, so that the next run in ``folder`` starts anew."""
    (Path(folder) / CHECKPOINT_FILE).unlink(missing_ok=True)
