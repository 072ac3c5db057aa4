"""What the benchmark scripts share: one measurement per fresh process, memory readings, the output."""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
from collections.abc import Callable
from typing import Any

import torch


def in_fresh_process(target: Callable[..., None], *args: Any) -> dict:
    """Run ``target(*args, queue)`` in a spawned process (its memory is its own) and return what it put."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def memory_now_mib(device: torch.device) -> float:
    """CUDA's allocated memory (its peak counter reset here), or the process's resident set on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_peak_mib(device: torch.device) -> float:
    """CUDA's peak allocation since :func:`memory_now_mib`, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def emit(table: str, json_path: str | None, payload: dict) -> None:
    """Print the table (the script's output) and, with ``--json``, write the payload."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2)
