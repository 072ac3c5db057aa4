"""Counting host-device synchronisations: how often training waits for the GPU.

Two counters, for tests and benchmarks:

* :func:`counting_host_syncs`: every operation that makes the host wait for the device, counted at PyTorch's
  dispatcher (a ``TorchDispatchMode``), wherever it is called from, PyTorch's own code included: scalar reads
  (``item``, ``bool``, ``float``, ``int``, ``__index__``, an f-string of a 0-d tensor: ``aten._local_scalar_dense``),
  ops whose output size depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``),
  the decompositions that CUDA's solvers finish on the host (``svd``/``svdvals``/``matrix_norm(ord=2)``,
  ``eig``/``eigh``), and copies from the device to the host (``.cpu()``, ``.tolist()``, ``.numpy()``).
  For a CUDA training it counts what touches CUDA tensors, as ``torch.cuda.set_sync_debug_mode`` does. For a CPU
  training it counts every such operation as if the tensors lived on a GPU, so the bound is testable on a CPU:
  the only exceptions are the values that stay on the host on every device, which a GPU run would not wait
  for either: the optimizers' step counters (PyTorch keeps them on the host unless ``capturable``) and draws
  read through :func:`host_value` (which refuses a device tensor).
* :func:`counting_cuda_syncs`: the synchronisations CUDA itself reports (PyTorch's sync debug mode); CUDA only.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense}
DATA_DEPENDENT = {
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.repeat_interleave,
}
HOST_SOLVERS = {aten._linalg_svd, aten.linalg_svd, aten._linalg_eigh, aten.linalg_eig, aten.linalg_eigvals}
MASK_INDEXING = {aten.index, aten.index_put, aten.index_put_}
COPIES = {aten._to_copy, aten.copy_}
HOST_READ_METHODS = ("tolist", "numpy", "cpu")  # on a CPU tensor these reach no operator: counted as methods

_declared = threading.local()


def host_value(t: Tensor) -> int | float | bool:
    """The value of ``t``, a tensor that lives on the host by design (a random draw from the CPU generator):
    reading it waits for no device, so the sync counter does not count it. A device tensor is refused."""
    if t.device.type != "cpu":
        raise ValueError(f"host_value reads host tensors only; this one is on {t.device} (reading it is a sync)")
    _declared.active = True
    try:
        return t.item()
    finally:
        _declared.active = False


def _tensors(values) -> Iterator[Tensor]:
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _called_from_optimizer() -> bool:
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if "torch/optim/" in frame.f_code.co_filename.replace("\\", "/"):
            return True
        frame = frame.f_back
    return False


class _SyncCounter(TorchDispatchMode):
    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.counts: dict[str, int] = {}

    def _on_device(self, tensors: list[Tensor]) -> bool:
        if self.device_type == "cpu":  # a CPU training: every tensor stands for a device tensor
            return bool(tensors)
        return any(t.device.type == self.device_type for t in tensors)

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        tensors = list(_tensors([*args, *kwargs.values()]))
        if packet in SCALAR_READS:
            host_by_design = self.device_type == "cpu" and (
                getattr(_declared, "active", False) or _called_from_optimizer()
            )
            if self._on_device(tensors) and not host_by_design:
                self.count("scalar_read")
        elif packet in DATA_DEPENDENT or packet in HOST_SOLVERS:
            if self._on_device(tensors):
                self.count(packet.__name__)
        elif packet in MASK_INDEXING:
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices) and self._on_device(
                tensors
            ):
                self.count("mask_indexing")
        elif packet in COPIES and self.device_type != "cpu":
            source = args[1] if packet is aten.copy_ else args[0]
            target = args[0].device if packet is aten.copy_ else kwargs.get("device", args[0].device)
            if source.device.type == self.device_type and torch.device(target).type == "cpu":
                self.count("device_to_host_copy")
        return func(*args, **kwargs)


@contextmanager
def counting_host_syncs(device: str | torch.device = "cpu") -> Iterator[dict[str, int]]:
    """Count the host-device synchronisations of a training on ``device`` inside the block.

    Yields a dict filled as the block runs: one entry per kind (``scalar_read``, ``nonzero``, ``_linalg_svd``,
    ``mask_indexing``, ``device_to_host_copy``, ``tolist``, ...) and ``n``, their total, set on exit.
    Not thread-safe (it patches three ``Tensor`` methods while it runs).
    """
    device_type = torch.device(device).type
    mode = _SyncCounter(device_type)
    originals = {name: getattr(Tensor, name) for name in HOST_READ_METHODS}

    def wrap(name: str, original):
        def read(self: Tensor, *args, **kwargs):
            if device_type == "cpu" and self.device.type == "cpu" and not getattr(_declared, "active", False):
                mode.count(name)  # on a GPU the same call is a device-to-host copy, counted by the mode
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(Tensor, name, wrap(name, original))
    try:
        with mode:
            yield mode.counts
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)
        mode.counts["n"] = sum(v for k, v in mode.counts.items() if k != "n")


@contextmanager
def counting_cuda_syncs() -> Iterator[dict[str, int]]:
    """Count the CUDA synchronisations inside the block (``counts["n"]``, filled in on exit)."""
    if not torch.cuda.is_available():
        raise RuntimeError("counting CUDA synchronisations needs a CUDA device")
    counts = {"n": 0}
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counts["n"] = sum("synchroniz" in str(w.message) for w in caught)
