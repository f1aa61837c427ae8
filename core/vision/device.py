"""Which processor does the work and how: device choice, precision, memory, threads.

Everything that depends on the device lives here, once, for extraction, fine-tuning and
prediction alike: picking CUDA / Apple MPS / CPU, mixed precision, out-of-memory
detection and clean-up, timing barriers, how many decoding processes to start and how
many threads the network gets. The app imports this module at start-up to draw the
device badge, so torch is imported inside the functions, not at module level.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


_VALID = "'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU number) or 'mps'"


def cpu_cores() -> int:
    """CPU cores this process may use (respects container and taskset limits, and the share a
    scheduler such as Ray gives a worker through ``OMP_NUM_THREADS``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(share))) if share.isdigit() and int(share) > 0 else cores


def _mps_available(torch_module) -> bool:
    mps = getattr(torch_module.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preference: str | torch.device | None = None) -> torch.device:
    """The device to compute on: the best available for ``None``/``"auto"``
    (CUDA, then Apple MPS, then CPU), or exactly the one asked for.

    Raises ``ValueError`` in plain words when the requested device does not exist here.
    """
    import torch

    if isinstance(preference, torch.device):
        preference = str(preference)
    choice = (preference or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available(torch):
            raise ValueError(
                "The Apple GPU (MPS) was asked for, but PyTorch cannot use one on this "
                "computer. Choose 'auto' or 'cpu'."
            )
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                "An NVIDIA GPU (CUDA) was asked for, but PyTorch finds none on this "
                "computer. Choose 'auto' or 'cpu'."
            )
        if choice == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        index_text = choice.split(":", 1)[1]
        if not index_text.isdigit():
            raise ValueError(f"Unknown device {preference!r}: use {_VALID}.")
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"GPU number {index} was asked for, but this computer has {count} "
                f"GPU{'s' if count != 1 else ''} (numbered from 0). Choose 'auto' or 'cuda:0'."
            )
        return torch.device("cuda", index)
    raise ValueError(f"Unknown device {preference!r}: use {_VALID}.")


def describe_device(device: str | torch.device | None) -> str:
    """A short label for people: "NVIDIA H100 80GB HBM3 · CUDA", "Apple GPU · MPS",
    "CPU · 2 cores"."""
    device = pick_device(device) if not _is_device(device) else device
    if device.type == "cuda":
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} · CUDA"
    if device.type == "mps":
        return "Apple GPU · MPS"
    cores = cpu_cores()
    return f"CPU · {cores} core{'s' if cores != 1 else ''}"


def _is_device(value) -> bool:
    return type(value).__name__ == "device" and hasattr(value, "type")


def device_summary() -> dict:
    """Facts for the device badge in the sidebar (all values JSON-friendly)."""
    import torch

    device = pick_device(None)
    summary = {
        "device": str(device),
        "kind": device.type,
        "label": describe_device(device),
        "accelerated": device.type != "cpu",
        "cpu_cores": cpu_cores(),
        "torch_version": torch.__version__,
        "gpu_memory_gb": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        summary["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    return summary


# --------------------------------------------------------------------------- running on it


def mixed_precision(device: torch.device, enabled: bool | None = None) -> torch.dtype | None:
    """The mixed-precision type for ``device``: bfloat16 (float16 where the GPU lacks it) on
    CUDA, None elsewhere (CPU autocast is slower than float32 on most laptops).
    ``enabled=False`` turns it off."""
    import torch

    if device.type != "cuda" or enabled is False:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None | str = "auto"):
    """Mixed precision on ``device`` (``dtype="auto"``: :func:`mixed_precision`), or nothing."""
    import torch

    if dtype == "auto":
        dtype = mixed_precision(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` says the device ran out of memory."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    """Give the memory of freed tensors back to the device (after running out of it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads the real time."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def default_workers(device: torch.device) -> int:
    """Photo-decoding processes: none on a CPU with 2 cores or fewer (a worker takes a core
    from the network: measured slower), else a few, leaving cores to the main process."""
    cores = cpu_cores()
    if device.type == "cpu":
        return 0 if cores <= 2 else min(4, cores // 2)
    return max(0, min(8, cores - 1))


@contextlib.contextmanager
def compute_settings(device: torch.device, *, workers: int = 0) -> Iterator[None]:
    """While the network runs: on the CPU it gets every core the decoding workers leave
    free; on CUDA cuDNN picks the fastest kernels (input sizes never change). Both are
    restored afterwards."""
    import torch

    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.set_num_threads(max(1, cpu_cores() - workers))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = bench


def worker_init(_worker_id: int) -> None:
    """Start of a decoding process: one thread (it must not fight the network for cores)
    and numpy/random seeded from the loader's per-worker torch seed (reproducible
    augmentation)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def infer_with_backoff(model: nn.Module, x: torch.Tensor, device: torch.device, state: dict) -> np.ndarray:
    """``model``'s output for batch ``x`` (float32 numpy), run in sub-batches of
    ``state['batch']`` on ``device``, channels-last unless ``state['channels_last']`` is
    False. When the device runs out of memory the sub-batch is halved (remembered in
    ``state``) and the same rows are tried again, down to one."""
    import numpy as np
    import torch

    fmt = torch.channels_last if state.get("channels_last", True) else torch.contiguous_format
    outputs, start = [], 0
    while start < len(x):
        step = state["batch"]
        try:
            with torch.inference_mode(), autocast(device):
                part = x[start : start + step].to(device, non_blocking=True, memory_format=fmt)
                out = model(part)
            outputs.append(out.float().cpu().numpy())
            start += step
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_oom(exc) or step == 1:
                raise
            state["batch"] = max(1, step // 2)
            empty_cache(device)
    return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)
