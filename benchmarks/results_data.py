"""A benchmark's result as data: what ran, on which machine, at which commit, and the figures.

Every result file in ``benchmarks/results/`` that a table of the README or the docs is rendered from carries a
``provenance`` block (:func:`provenance`); :mod:`benchmarks.render` turns the files into the tables.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance(device: str = "cpu") -> dict[str, Any]:
    """Where and with what a result was measured."""
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "device": gpu or "cpu",
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit(),
    }


def write_result(name: str, result: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """Write ``result`` as ``directory/name.json`` (indented, keys sorted: a diff shows what changed)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def read_result(name: str, directory: Path = RESULTS_DIR) -> dict[str, Any]:
    path = directory / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no result {path}: run the benchmark that writes it first")
    return json.loads(path.read_text())
