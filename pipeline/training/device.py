"""Device selection."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> None:
    """Validate a device option (for configs): a known name, and CUDA only where a GPU is visible."""
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"unknown device {name!r}; choose one of {DEVICES} or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was requested but no CUDA GPU is visible here; use --device cpu or auto")
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` without a GPU is an error."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
