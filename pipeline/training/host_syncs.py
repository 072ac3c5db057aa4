"""Counting host-device synchronisations: how often training waits for the GPU.

Two counters, for tests and benchmarks:

* :func:`counting_value_reads`: every read of a tensor's value (``item``, ``bool``, ``float``, ``int``,
  ``tolist``, ``numpy``) made from code under the given directories. Works on any device, so the bound
  is testable on CPU; on a GPU each such read of a device tensor is a stall.
* :func:`counting_cuda_syncs`: the synchronisations CUDA itself sees (PyTorch's sync debug mode warns
  at each one), including those inside PyTorch; CUDA only.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

VALUE_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")
PIPELINE_CODE = str(Path(__file__).resolve().parents[1])


@contextmanager
def counting_value_reads(code_roots: Sequence[str] = (PIPELINE_CODE,)) -> Iterator[dict[str, int]]:
    """Count value reads made directly from files under ``code_roots`` (``counts["n"]``); not thread-safe."""
    counts = {"n": 0}
    roots = tuple(str(r) for r in code_roots)
    originals = {name: getattr(torch.Tensor, name) for name in VALUE_READS}

    def wrap(original):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(roots):
                counts["n"] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


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
