"""Atomic training checkpoints with everything needed to continue exactly where a run stopped.

A checkpoint holds only tensors and plain data (numbers, strings, lists, dicts) and is read with
``torch.load(weights_only=True)``: loading one never runs code from the file. ``format`` names the
layout; a file without it (an older pickle) or unreadable (truncated) is refused with a message
naming the file. It is always read onto the CPU: ``load_state_dict`` places each tensor where the model
and optimizer keep it (an optimizer's step counters stay on the host), and the RNG states stay the CPU
byte tensors that ``torch.set_rng_state`` takes, whichever device trains.

A process training into a run's checkpoint directory holds its :func:`checkpoint_lease`, an exclusive
lock that the operating system drops when the process ends, however it ends: a second process (a
``--resume`` of a run that is still training) is refused, a crashed run can be resumed at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "iresnet-pipeline/checkpoint-v2"

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain data."""
    key, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # the tuple form, not a dict
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": key,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a rank trains on one, and a resume may see fewer GPUs than were visible
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])
        elif "cuda" in state:  # older checkpoints: every visible GPU's; this process's is the current one's
            index = torch.cuda.current_device()
            if index < len(state["cuda"]):
                torch.cuda.set_rng_state(state["cuda"][index])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a dead mount); the previous file is intact."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # Ctrl-C or SIGTERM wait until the file is written: raised inside torch.save's writer, either would come out
        # as a failed write ("enforce fail"), and the stop would be lost
        with _signals_deferred(), _reported_as_write_error(path):
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM are held back (delivered on exit) in the block; where signals cannot be masked (not
    the main thread, no ``pthread_sigmask``) the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def _reported_as_write_error(path: Path) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, OSError) as exc:  # torch.save reports a failed write as an "enforce fail"
        free = shutil.disk_usage(path.parent).free
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise CheckpointWriteError(
            f"cannot write the checkpoint {path} ({reason}; {free:,} bytes free on its filesystem)"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this project's format safely (``weights_only``) onto the CPU; ValueError names a
    bad file."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # no Python object refused: not a pickle (random bytes, another format)
            reason = " ".join(str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
            raise ValueError(
                f"the checkpoint {path} cannot be read (truncated or not a checkpoint): {reason[:200]}"
            ) from None
        raise ValueError(
            f"the checkpoint {path} holds Python objects beyond tensors and plain data (an older version's or "
            "another program's format); it is refused because loading it could run arbitrary code. Start a "
            "new run, or load it yourself with torch.load(weights_only=False) only if you trust the file"
        ) from exc
    except Exception as exc:  # torch.load's errors for a truncated or foreign file: RuntimeError, EOFError, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ValueError(f"the checkpoint {path} cannot be read (truncated or not a checkpoint): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"the checkpoint {path} is not in this project's format {CHECKPOINT_FORMAT!r} ({found!r})")
    return state


class RunInUse(ValueError):
    """Another live process holds the lease of a run's checkpoint directory."""


LEASE_FILE = "lease"


@contextmanager
def checkpoint_lease(directory: str | Path) -> Iterator[None]:
    """Hold the exclusive lease of a run's checkpoint ``directory`` (created) while the block runs.

    The lease is an ``flock`` on ``directory/lease``: released by the operating system when this process ends,
    by a crash or ``kill -9`` too, so only a live process can hold it. A second holder is refused with
    :class:`RunInUse`, naming the process (pid and host) that holds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LEASE_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            leased = True
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunInUse(
                f"the run whose checkpoints are in {directory} is still training ({holder} holds it); two processes "
                "would train into one run and one checkpoint. Stop that process first (its run can then be resumed)"
            ) from None
        except OSError as exc:  # a filesystem without locks (ENOLCK): train, but unguarded
            log.warning("cannot lease %s (%s): a second --resume of this run would not be refused", directory, exc)
            leased = False
        if leased:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
        try:
            yield
        finally:
            if leased:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)
