"""A process's entry point: :class:`EntryPoint` turns a config class, its presets and a ``run(cfg)`` into
``main(argv)``: parse, validate, set up the process (threads, subnormal floats), run, and report a user's error as
one line (exit 2), Ctrl-C as 130 and SIGTERM as 143, each also recorded on the run ``mlflow run`` launched."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import mlflow

from experiments import command_line
from experiments import config as configuration
from experiments.tracking_store import configure_tracking
from pipeline.data import DatasetNotFoundError
from pipeline.logging_setup import setup_logging
from pipeline.training.device import apply_thread_budget
from pipeline.training.numerics import flush_denormals

C = TypeVar("C")


def entry_point_logger(config_cls: type) -> logging.Logger:
    """The entry point's logger, named after its module even when it runs as ``__main__`` (``python -m``),
    so that its records (the run id, "resumed at epoch N") pass :func:`setup_logging`'s project loggers."""
    return logging.getLogger(configuration.entry_point_module(config_cls))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Slurm, Kubernetes, ``docker stop``; torchrun forwards it to every rank):
    stops a run exactly as Ctrl-C does, so every record of it says it was stopped."""


SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM (143)


SIGINT_EXIT = 128 + signal.SIGINT  # 130


@contextmanager
def stopping_on_sigterm() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` in the main thread (once; a second one is ignored
    while the run records its stop, which then cannot be cut short by the same signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that a user's input or environment causes, reported as one line (exit 2), not a traceback.

    Bad values (``ValueError``, ``TypeError``), missing data, paths that cannot be written or read, a
    diverged training (``FloatingPointError``) and a tracking store that refuses the request.
    """
    from mlflow.exceptions import MlflowException

    return (ValueError, TypeError, DatasetNotFoundError, OSError, FloatingPointError, MlflowException)


def _tag_launched_run(reason: str, key: str = "failure") -> None:
    """Under ``mlflow run``, a failure before the entry point claimed its launched run still says why there."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched:
        return
    try:
        configure_tracking()
        mlflow.tracking.MlflowClient().set_tag(launched, key, reason[:5000])
    except Exception:
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + " ..."


@dataclass(frozen=True)
class EntryPoint(Generic[C]):
    """An entry point: its config class, presets (``None``: the fields alone) and ``run(cfg) -> run id``."""

    config_cls: type[C]
    presets: dict[str, dict] | None
    run: Callable[[C], str]
    description: str | None = None

    def config_from_preset(self, preset: str, **overrides: Any) -> C:
        return configuration.config_from_preset(self.config_cls, self.presets or {}, preset, **overrides)

    def config_for_resume(self, run_id: str, **overrides: Any) -> C:
        return configuration.config_for_resume(self.config_cls, run_id, **overrides)

    def main(self, argv: list[str] | None = None) -> int:
        """Parse, validate, run; returns the process exit code (0, or 2 with one line on a user error).

        A user error (:func:`user_errors`) is logged as one line naming the cause (the traceback only at
        DEBUG level); a run it interrupts is already FAILED with the reason as its ``failure`` tag. Subnormal
        floats are flushed to zero in every CPU thread before the run (:mod:`pipeline.training.numerics`):
        values below ~1e-38 become zero instead of slowing every operation on them 10-100x.
        """
        setup_logging()
        log = entry_point_logger(self.config_cls)
        try:
            cfg = command_line.parse_config(self.config_cls, self.presets, argv, self.description)
            threads = apply_thread_budget(getattr(cfg, "threads", 0))
            flush_denormals()  # after the thread budget, so every intra-op worker it starts flushes too
            log.debug("%d CPU threads", threads)
        except command_line.CommandLineError as exc:  # argparse said why on stderr; the launched run records it
            _tag_launched_run(f"invalid command line: {exc.message}")
            raise
        except user_errors() as exc:
            log.error("invalid configuration: %s", _one_line(exc))
            log.debug("details", exc_info=True)
            _tag_launched_run(f"invalid configuration: {_one_line(exc)}")
            return 2
        try:
            with stopping_on_sigterm():
                run_id = self.run(cfg)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: every run it cut is already KILLED
            what = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            log.error("stopped by %s: %s", what, getattr(exc, "stop_hint", "before a run had started"))
            log.debug("details", exc_info=True)
            _tag_launched_run(f"stopped by {what}", key="stopped")
            return SIGTERM_EXIT if isinstance(exc, Terminated) else SIGINT_EXIT
        except user_errors() as exc:
            log.error("%s: %s", type(exc).__name__, _one_line(exc))
            log.debug("details", exc_info=True)
            _tag_launched_run(f"{type(exc).__name__}: {_one_line(exc)}")
            return 2
        log.info("finished run %s", run_id)
        return 0
