"""Which processor does the work: a CUDA GPU, an Apple GPU (MPS) or the CPU.

The app imports this module at start-up to draw the device badge, so torch is imported
inside the functions, not at module level.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_VALID = "'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU number) or 'mps'"


def cpu_cores() -> int:
    """CPU cores this process may use (respects container and taskset limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


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
