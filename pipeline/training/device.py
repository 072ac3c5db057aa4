"""Device selection."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> None:
    """Validate a device option without touching the hardware (for configs)."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES} or cuda:N")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without a GPU is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available on this machine")
    return torch.device(name)
