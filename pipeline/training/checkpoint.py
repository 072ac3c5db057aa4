"""Atomic training checkpoints with everything needed to continue exactly where a run stopped.

A checkpoint holds only tensors and plain data (numbers, strings, lists, dicts) and is read with
``torch.load(weights_only=True)``: loading one never runs code from the file. ``format`` names the
layout; a file without it (an older pickle) or unreadable (truncated) is refused with a message
naming the file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "iresnet-pipeline/checkpoint-v2"


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain data."""
    key, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint of this project's format safely (``weights_only``); ValueError names a bad file."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"the checkpoint {path} holds Python objects beyond tensors and plain data (an older version's or "
            "another program's format); it is refused because loading it could run arbitrary code. Start a "
            "new run, or load it yourself with torch.load(weights_only=False) only if you trust the file"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"the checkpoint {path} cannot be read (truncated or not a checkpoint): {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"the checkpoint {path} is not in this project's format {CHECKPOINT_FORMAT!r} ({found!r})")
    return state
