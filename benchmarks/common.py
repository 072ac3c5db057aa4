"""What the benchmark scripts share: one measurement per fresh process, memory readings, the output."""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import shlex
import sys
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import torch

from benchmarks.results_data import provenance


class CaseFailed(RuntimeError):
    """A benchmark case's process died or ran out of time before it reported its measurement."""


def in_fresh_process(target: Callable[..., None], *args: Any, timeout_s: float = 3600.0) -> dict:
    """Run ``target(*args, queue)`` in a spawned process (its memory is its own) and return what it put.

    A process that dies first (an exception, out of memory, a signal) or runs past ``timeout_s`` is reported as
    :class:`CaseFailed` with its exit code, instead of a wait for a result that never comes.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                result = queue.get(timeout=0.5)
                break
            except Empty:
                if not proc.is_alive() and queue.empty():
                    raise CaseFailed(
                        f"{getattr(target, '__name__', target)}{args[:1]!r}: the process ended with exit code "
                        f"{proc.exitcode} before reporting a result"
                    ) from None
                if time.monotonic() > deadline:
                    raise CaseFailed(
                        f"{getattr(target, '__name__', target)}{args[:1]!r}: no result within {timeout_s:g} s"
                    ) from None
    finally:
        if proc.is_alive() and time.monotonic() > deadline:
            proc.kill()
        proc.join()
    return result


def counted_flops(work: Callable[[], object]) -> float:
    """Floating-point operations of ``work`` as PyTorch counts them (``FlopCounterMode``: the matrix products and
    convolutions, forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


def memory_now_mib(device: torch.device) -> float:
    """CUDA's allocated memory, or the process's resident set on CPU; the peak counter is reset here (on CPU where
    Linux allows it: ``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: the peak resident set (VmHWM) starts again from the current one
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_peak_mib(device: torch.device) -> float:
    """CUDA's peak allocation since :func:`memory_now_mib`, or on CPU this process's own peak resident set since
    then (``VmHWM``). Not ``ru_maxrss``: a spawned child's starts at its parent's peak, so a child smaller than its
    parent would report the parent's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError("no VmHWM in /proc/self/status: the peak resident set is unknown on this system")


def emit(table: str, json_path: str | None, payload: dict) -> None:
    """Print the table (the script's output) and, with ``--json``, write the payload with its ``provenance``
    (device, CPU model, cores, torch, python, commit: :func:`benchmarks.results_data.provenance`) and the command."""
    print(table)
    if json_path:
        device = str(payload.get("config", {}).get("device", "cpu"))
        resolved = "cuda" if device == "auto" and torch.cuda.is_available() else device
        stamped = {**payload, "provenance": provenance(resolved), "command": shlex.join(["python", "-m", *_argv()])}
        with open(json_path, "w") as f:
            json.dump(stamped, f, indent=2, sort_keys=True)
            f.write("\n")


def _argv() -> list[str]:
    """The benchmark's module and arguments as run (``python -m benchmarks.X ...``)."""
    module = sys.modules["__main__"].__spec__
    return [module.name if module is not None else sys.argv[0], *sys.argv[1:]]
