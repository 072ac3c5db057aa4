"""Device selection and the CPU thread budget of a process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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


LOCAL_WORKERS_ENV = "IRESNET_LOCAL_WORKERS"


def local_workers() -> int:
    """Processes sharing this machine's cores: torchrun's ``LOCAL_WORLD_SIZE``, else ``IRESNET_LOCAL_WORKERS``
    (set it when starting several sweep workers on one machine), else 1."""
    for name in ("LOCAL_WORLD_SIZE", LOCAL_WORKERS_ENV):
        value = os.environ.get(name, "")
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            return int(value)
    return 1


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_budget(threads: int = 0) -> int:
    """``threads`` if > 0, else the usable cores divided among the local workers (at least 1)."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: automatic), got {threads}")
    if threads:
        return threads
    return max(1, usable_cores() // local_workers())


def apply_thread_budget(threads: int = 0) -> int:
    """Set PyTorch's intra-op threads to :func:`thread_budget`; returns it.

    Processes that each use every core collapse one another (measured: an epoch 36x slower with three
    other PyTorch processes beside it), so every worker takes its share.
    """
    n = thread_budget(threads)
    torch.set_num_threads(n)
    return n


def use_deterministic_algorithms(enabled: bool = True) -> None:
    """Deterministic kernels everywhere: what makes "a resumed run reproduces an uninterrupted one exactly"
    hold on GPUs too (CUDA convolution backward and cuBLAS reductions are otherwise nondeterministic;
    CPU kernels already are). Costs some GPU speed; an op without a deterministic kernel then raises."""
    if not enabled:
        # cuDNN then times its convolution algorithms once per input shape and keeps the fastest (the shapes of a
        # training are fixed); only where CUDA is used, and never with deterministic kernels
        torch.backends.cudnn.benchmark = True
        return
    # cuBLAS needs a fixed workspace to be deterministic; read when CUDA initialises, so set it first
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """:func:`use_deterministic_algorithms` for the block: what a run asks for (``deterministic``) holds for that run,
    whether it was started from the command line, a sweep's trial, ``reproduce`` or the library, and the process's
    previous settings come back after it."""
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.benchmark, cudnn.deterministic = saved[2], saved[3]
