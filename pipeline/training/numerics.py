"""Flushing subnormal floats to zero on CPU, in every thread that computes.

Subnormal (denormal) floats, below ~1.2e-38 in float32, cost 10-100x a normal operation on x86
CPUs. A classifier that grows confident produces them (softmax probabilities of the wrong classes
underflow, and their gradients flow back through every layer), and its steps slow down 4-5x over a
training. FTZ/DAZ (flush-to-zero, denormals-are-zero) treats them as zero at full speed; the values
lost are below 1.2e-38 (float32) or 2.2e-308 (float64), far below anything a metric can see.

The MXCSR flags are per thread: ``torch.set_flush_denormal`` sets only the calling thread's, and
OpenMP's intra-op workers inherit them only if created afterwards. :func:`flush_denormals` also
sets them in each worker of the OpenMP team (through libgomp's ``GOMP_parallel``), then checks
every worker with :func:`denormals_flushed_in_every_thread`.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

import torch

log = logging.getLogger(__name__)

_SUBNORMAL = 1e-39  # a float32 subnormal
_GRAIN = 32768  # ATen's grain size for element-wise kernels: one chunk per thread at least this long


@cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch has loaded (libgomp, or Intel's libiomp5, which exports the GOMP ABI)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "gomp" in line or "iomp5" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle torch uses
            lib.GOMP_parallel  # noqa: B018 - the symbol must exist
        except (OSError, AttributeError):
            continue
        return lib
    return None


def _in_every_openmp_thread(enabled: bool) -> bool:
    lib = _openmp_runtime()
    if lib is None:
        return False
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _data: torch.set_flush_denormal(enabled))
    lib.GOMP_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    lib.GOMP_parallel(callback, None, torch.get_num_threads(), 0)  # each team member runs the callback
    return True


def denormals_flushed_in_every_thread() -> bool:
    """Whether every intra-op thread flushes: a subnormal times one is zero in every thread's chunk."""
    n = max(torch.get_num_threads(), 1) * _GRAIN * 4
    return bool(((torch.full((n,), _SUBNORMAL) * 1.0) == 0).all())


def flush_denormals(enabled: bool = True) -> bool:
    """Set (or clear) FTZ/DAZ in this thread and every intra-op worker; returns whether it now holds everywhere.

    Call it again after ``torch.set_num_threads`` raises the thread count (new workers inherit the
    flags from this thread, so that case is covered too). Returns ``False`` where the CPU has no
    FTZ/DAZ (non-x86) or a worker could not be reached; a warning says so.
    """
    if not torch.set_flush_denormal(enabled):
        if enabled:
            log.warning("this CPU cannot flush subnormal floats to zero (no FTZ/DAZ); subnormals may slow training")
        return False
    reached = _in_every_openmp_thread(enabled)
    holds = denormals_flushed_in_every_thread() == enabled
    if enabled and not holds:
        log.warning(
            "subnormal floats are flushed in the main thread only (OpenMP runtime %s); call flush_denormals() "
            "before the first parallel operation",
            "not found" if not reached else "reached, but a worker did not flush",
        )
    return holds
