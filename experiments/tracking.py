"""A tracked run's life: started, resumed or nested, ended with the status that says what happened, and
what it logs (metrics retried through store failures, params, JSON and CSV artifacts, the configuration).

When an entry point is launched by ``mlflow run``, MLflow hands it a run (``MLFLOW_RUN_ID``) and that run is
used. The store itself is :mod:`experiments.tracking_store`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from experiments.tracking_store import PROJECT_ROOT, configure_tracking, default_tracking_uri, retry_tracking_write

log = logging.getLogger(__name__)


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created (artifacts in ``<project>/mlartifacts``) if new."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if mlflow.get_tracking_uri() == default_tracking_uri():
        location = (PROJECT_ROOT / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def run_status(run_id: str) -> str:
    """``RUNNING``, ``FINISHED``, ``FAILED``, ... of a run in the configured store (ValueError if unknown)."""
    configure_tracking()
    try:
        return MlflowClient().get_run(run_id).info.status
    except Exception as exc:
        raise ValueError(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}") from exc


_RUN_START_HOOKS: list[Callable[[str], None]] = []


@contextmanager
def on_run_start(hook: Callable[[str], None]) -> Iterator[None]:
    """Call ``hook(run_id)`` as soon as :func:`tracked_run` starts a new run inside this block (e.g. a sweep
    links its trial to the run at once, so a worker that dies mid-trial leaves both records matched)."""
    _RUN_START_HOOKS.append(hook)
    try:
        yield
    finally:
        _RUN_START_HOOKS.remove(hook)


class RunStopped(Exception):
    """Raised to stop a run on purpose (e.g. a pruned trial): the run is marked KILLED, not FAILED."""


@contextmanager
def tracked_run(
    experiment_name: str,
    *,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run; mark it FAILED if the body raises (KILLED on Ctrl-C or :class:`RunStopped`).

    With a run already active (a sweep's parent run), the new run is nested under it. ``log_system_metrics``
    starts MLflow's monitor of CPU, memory and GPU use (``system/*`` metrics, every 10 s by default).
    """
    system: bool | None = True if log_system_metrics else None  # None: MLflow's own default (its environment)
    configure_tracking()
    launched_run = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        client = MlflowClient()
        try:
            previous = client.get_run(resume_run_id)
        except Exception as exc:
            raise ValueError(f"cannot resume: no run {resume_run_id!r} in {mlflow.get_tracking_uri()}") from exc
        if launched_run and launched_run != resume_run_id:
            client.set_tag(launched_run, "mlflow.note.content", f"resumed run {resume_run_id}; see that run")
            client.set_tag(launched_run, "resumed_run_id", resume_run_id)
            os.environ.pop("MLFLOW_RUN_ID", None)
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system)
        for key in ("failure", "stopped"):  # the interruption is history now: keep it, but not as the run's state
            if key in previous.data.tags:
                client.set_tag(resume_run_id, f"previous_{key}", previous.data.tags[key])
                client.delete_tag(resume_run_id, key)
    elif launched_run and mlflow.active_run() is None:
        run = mlflow.start_run(run_id=launched_run, log_system_metrics=system)
        # claimed: a later start_run(nested=True) would otherwise silently resume this run again
        os.environ.pop("MLFLOW_RUN_ID", None)
    elif (parent := mlflow.active_run()) is not None:
        run = mlflow.start_run(
            experiment_id=parent.info.experiment_id, run_name=run_name, nested=True, log_system_metrics=system
        )
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id(experiment_name), run_name=run_name, log_system_metrics=system
        )
    try:
        if not resume_run_id:
            for hook in list(_RUN_START_HOOKS):
                hook(run.info.run_id)
        yield run
    except (KeyboardInterrupt, RunStopped) as exc:
        _end_active_run("KILLED", "stopped", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if not hasattr(exc, "stop_hint"):  # what the entry point says of the stop (an inner run's, if any)
            exc.stop_hint = f"run {run.info.run_id} is marked KILLED"  # type: ignore[union-attr]
        raise
    except BaseException as exc:
        _end_active_run("FAILED", "failure", f"{type(exc).__name__}: {exc}")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def active_run_id() -> str:
    """The id of MLflow's active run (a clear error where there is none)."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no MLflow run is active")
    return run.info.run_id


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """``mlflow.log_metrics`` to the active run, retried with backoff while the store is locked or unreachable.

    MLflow's SQLite store waits 20 s for a lock; a store held longer (a backup, a long query from another
    process) would otherwise crash a training over a metric. After the retries the error propagates and
    the run ends FAILED.
    """
    retry_tracking_write(lambda: mlflow.log_metrics(metrics, step=step))


def _end_active_run(status: str, tag: str, reason: str) -> None:
    """End the active run with ``status`` and say why, even when the store is what failed.

    ``mlflow.end_run`` takes the run off the active stack *before* writing, so once it is called the
    exit hook can no longer end the run FINISHED; the status write is then retried. The reason tag is
    best effort: a store that refuses it must not leave the run looking finished.
    """
    run_id = active_run_id()
    client = MlflowClient()
    try:
        mlflow.end_run(status=status)
    except Exception:
        try:
            retry_tracking_write(lambda: client.set_terminated(run_id, status=status))
        except Exception:
            log.exception("could not record run %s as %s", run_id, status)
    try:
        retry_tracking_write(lambda: client.set_tag(run_id, tag, reason[:5000]), attempts=2)
    except Exception:
        log.exception("could not tag run %s with its %s reason", run_id, tag)


@contextmanager
def orchestrator_run(experiment_name: str, *, run_name: str | None = None) -> Iterator[str]:
    """A run for a job that starts other runs (``reproduce``): its id, never the active (fluent) run.

    Under ``mlflow run`` it is the launched run, claimed here first, so that no training started
    inside takes it over; otherwise a new run in ``experiment_name``. It is not made active, so every
    run started inside is a run of its own in its own experiment. It ends FINISHED, or FAILED (with a
    ``failure`` tag) or KILLED if the body raises.
    """
    configure_tracking()
    client = MlflowClient()
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    run_id = launched or client.create_run(experiment_id(experiment_name), run_name=run_name).info.run_id
    if launched and run_name:
        client.set_tag(run_id, "mlflow.runName", run_name)
    try:
        yield run_id
    except KeyboardInterrupt:
        retry_tracking_write(lambda: client.set_terminated(run_id, status="KILLED"))
        raise
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"[:5000]
        retry_tracking_write(lambda: client.set_terminated(run_id, status="FAILED"))
        retry_tracking_write(lambda: client.set_tag(run_id, "failure", reason))
        raise
    else:
        retry_tracking_write(lambda: client.set_terminated(run_id, status="FINISHED"))


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows (dicts with the same keys) as a CSV file with a header, for an artifact folder."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def log_json(obj: Any, artifact_file: str) -> None:
    retry_tracking_write(lambda: mlflow.log_text(json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file))


def log_params_flat(params: dict[str, Any], prefix: str = "") -> None:
    """Log a nested dict as flat ``a.b`` params. A key already logged with another value raises (MLflow)."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], pre: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{pre}{k}.")
            else:
                flat[f"{pre}{k}"] = v

    walk(params, prefix)
    if flat:
        retry_tracking_write(lambda: mlflow.log_params(flat))
