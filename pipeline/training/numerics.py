"""Flushing subnormal floats to zero on CPU, in every thread that computes.

Subnormal (denormal) floats, below ~1.2e-38 in float32, cost 10-100x a normal operation on many
x86 CPUs. A trained i-ResNet classifier produces them in its backward pass (ELU's gradient ``exp(x)``
at strongly negative pre-activations, fed into the next convolution's backward), and its steps were
seen to slow down 4-5x over a training on such a CPU. FTZ/DAZ (flush-to-zero, denormals-are-zero)
treats them as zero at full speed; the values lost are below 1.2e-38 (float32) or 2.2e-308
(float64), far below anything a metric can see.

The MXCSR flags are per thread: ``torch.set_flush_denormal`` sets only the calling thread's, and
OpenMP's intra-op workers inherit them only if created afterwards. :func:`flush_denormals` also
sets them in each worker of the OpenMP team (through libgomp's ``GOMP_parallel``), then checks
every worker with :func:`denormals_flushed_in_every_thread`.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_GRAIN = 32768  # ATen's grain size for element-wise kernels: one chunk per thread at least this long


@cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process, torch's own first (libgomp, or Intel's libiomp5 with the GOMP ABI).

    Other wheels bring their own copy (scikit-learn's libgomp): a team of that copy is not torch's.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "gomp" in line or "iomp5" in line}
    except OSError:
        return ()
    torch_dir = str(Path(torch.__file__).resolve().parent)
    runtimes = []
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle
            lib.GOMP_parallel  # noqa: B018 - the symbol must exist
        except (OSError, AttributeError):
            continue
        runtimes.append(lib)
    return tuple(runtimes)


def _in_every_thread_of(lib: ctypes.CDLL, enabled: bool) -> None:
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _data: torch.set_flush_denormal(enabled))
    lib.GOMP_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel.restype = None
    lib.GOMP_parallel(callback, None, torch.get_num_threads(), 0)  # each team member runs the callback


def _flushed_fraction() -> float:
    """Fraction of a subnormal tensor that an element-wise op flushes: 1 if every thread flushes, 0 if none does."""
    n = max(torch.get_num_threads(), 1) * _GRAIN * 4  # every thread gets a chunk
    # the smallest float32 subnormal from its bit pattern: converting 1e-39 under FTZ would already give 0
    subnormal = torch.ones(n, dtype=torch.int32).view(torch.float32)
    return float(((subnormal * 1.0) == 0).float().mean())


def denormals_flushed_in_every_thread() -> bool:
    """Whether every intra-op thread flushes: a subnormal times one is zero in every thread's chunk."""
    return _flushed_fraction() == 1.0


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
    target = 1.0 if enabled else 0.0  # every thread flushes, or none does
    holds = _flushed_fraction() == target
    for runtime in _openmp_runtimes():  # torch's own first; verified after each
        if holds:
            break
        _in_every_thread_of(runtime, enabled)
        holds = _flushed_fraction() == target
    if enabled and not holds:
        log.warning(
            "subnormal floats are flushed in the main thread only (%d OpenMP runtimes tried); call "
            "flush_denormals() before the first parallel operation",
            len(_openmp_runtimes()),
        )
    return holds
