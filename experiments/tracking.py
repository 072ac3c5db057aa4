"""A tracked run's life: started, resumed or nested, ended with the status that says what happened, and
what it logs (metrics retried through store failures, params, JSON and CSV artifacts, the configuration).

When an entry point is launched by ``mlflow run``, MLflow hands it a run (``MLFLOW_RUN_ID``) and that run is
used. The store itself is :mod:`experiments.tracking_store`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from experiments.tracking_store import TrackingStoreUnreachable, configure_tracking, retry_tracking_write

log = logging.getLogger(__name__)


# What a run is, as run tags every training run writes: the report selects runs by them, wherever they are
ENTRY_POINT_TAG = "entry_point"  # density, classify, toy, sweep
PRESET_TAG = "preset"
# The experiment's kind: MLflow 3's UI shows a "custom_model_development" experiment in its training views
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description, shown (as markdown) on its overview page
RUN_NAME_TAG = "mlflow.runName"


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if new: its artifacts beside the SQLite store (``<project>/mlartifacts``
    for the default store), else in the store's default location; tagged as a training experiment."""
    client = MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})


def mark_training_experiment(experiment: str) -> None:
    """Tag experiment ``experiment`` (an id) as a training experiment, unless it already has a kind."""
    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment).tags:
        retry_tracking_write(lambda: client.set_experiment_tag(experiment, EXPERIMENT_KIND_TAG, TRAINING_KIND))


def run_page(run: mlflow.entities.Run) -> str:
    """Where to look at ``run`` in the MLflow UI (in its training view): the server's address for a tracking server,
    else the ``mlflow ui`` command and the page it serves."""
    path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{path}"


def is_generated_run_name(name: str) -> bool:
    """Whether ``name`` is one MLflow made up (``welcoming-wolf-820``: its own words and a number), not a user's."""
    from mlflow.utils import name_utils

    match = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d+)", name or "")
    if match is None:
        return False
    return match[1] in name_utils._GENERATOR_PREDICATES and match[2] in name_utils._GENERATOR_NOUNS


def set_description(run_id: str, text: str) -> None:
    """The run's description (MLflow's ``mlflow.note.content``, markdown), replacing what it said before."""
    client = MlflowClient()
    retry_tracking_write(lambda: client.set_tag(run_id, DESCRIPTION_TAG, text[:5000]))


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
    tags: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run; mark it FAILED if the body raises (KILLED on Ctrl-C or :class:`RunStopped`).

    With a run already active (a sweep's parent run), the new run is nested under it. ``log_system_metrics``
    starts MLflow's monitor of CPU, memory and GPU use (``system/*`` metrics, every 10 s by default). ``tags`` (what
    the run is: :data:`ENTRY_POINT_TAG`, :data:`PRESET_TAG`) are set on a new run. A run launched by ``mlflow run``
    takes ``run_name`` where MLflow made its name up; a name given with ``mlflow run --run-name`` stays. The run's
    experiment is tagged as a training experiment (MLflow's UI then shows it in its training view).
    """
    system: bool | None = True if log_system_metrics else None  # None: MLflow's own default (its environment)
    configure_tracking()
    launched_run = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        run = _start_resumed(resume_run_id, launched_run, system)
    elif launched_run and mlflow.active_run() is None:
        _check_launched(launched_run)
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
            _identify(run, run_name, tags or {})
            for hook in list(_RUN_START_HOOKS):
                hook(run.info.run_id)
        yield run
    except TrackingStoreUnreachable as exc:  # one quick try: the store has not answered for a while
        with _requests_not_retried():
            _end_active_run("FAILED", "failure", f"{type(exc).__name__}: {exc}", attempts=1)
        raise
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


def _start_resumed(run_id: str, launched_run: str | None, system: bool | None) -> mlflow.ActiveRun:
    """Run ``run_id`` active again; a run ``mlflow run`` launched for the resume points to it, and the tags of the
    interruption are kept as ``previous_*``."""
    client = MlflowClient()
    try:
        previous = client.get_run(run_id)
    except Exception as exc:
        raise ValueError(f"cannot resume: no run {run_id!r} in {mlflow.get_tracking_uri()}") from exc
    if launched_run and launched_run != run_id:
        client.set_tag(launched_run, "mlflow.note.content", f"resumed run {run_id}; see that run")
        client.set_tag(launched_run, "resumed_run_id", run_id)
        os.environ.pop("MLFLOW_RUN_ID", None)
    run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
    for key in ("failure", "stopped"):  # the interruption is history now: keep it, but not as the run's state
        if key in previous.data.tags:
            client.set_tag(run_id, f"previous_{key}", previous.data.tags[key])
            client.delete_tag(run_id, key)
    return run


def _check_launched(run_id: str) -> None:
    """``MLFLOW_RUN_ID`` (set by ``mlflow run`` for the run it launched) must name a run that is RUNNING: one left in
    the environment from an earlier job names a finished run, which a new training would write into."""
    try:
        status = MlflowClient().get_run(run_id).info.status
    except Exception:
        raise ValueError(
            f"MLFLOW_RUN_ID names run {run_id!r}, which {mlflow.get_tracking_uri()} does not hold"
        ) from None
    if status != "RUNNING":
        raise ValueError(
            f"MLFLOW_RUN_ID names run {run_id}, which is {status}: a new training would write into it; unset "
            "MLFLOW_RUN_ID (mlflow run sets it for the run it launches), or continue that run with --resume"
        )


def _identify(run: mlflow.ActiveRun, run_name: str | None, tags: Mapping[str, str]) -> None:
    """A new run's tags and name, and its experiment's kind."""
    client = MlflowClient()
    run_id = run.info.run_id
    named = {RUN_NAME_TAG: run_name} if run_name and is_generated_run_name(run.info.run_name) else {}
    for key, value in {**tags, **named}.items():
        retry_tracking_write(partial(client.set_tag, run_id, key, value))
    mark_training_experiment(run.info.experiment_id)


def active_run_id() -> str:
    """The id of MLflow's active run (a clear error where there is none)."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no MLflow run is active")
    return run.info.run_id


# the metrics of runs logged before the names were grouped by prefix: a reader of old runs reads these too
LEGACY_METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "test/bpd": ("test_bpd",),
    "test/standard_error_bpd": ("test_standard_error",),
    "test/bias_bound_bpd": ("test_bias_bound",),
    "test/images": ("test_n_images",),
    "test/series_terms": ("test_n_terms",),
    "test/passes": ("test_n_passes",),
    "test/max_block_lipschitz": ("test_max_block_lipschitz",),
    "test/converged": ("test_converged",),
    "test/unbiased": ("test_unbiased",),
    "val/bpd": ("val_bpd",),
    "test/error_percent": ("test_error",),
    "val/error_percent": ("val_error",),
    "lipschitz/certified_invertible": ("certified_invertible",),
    "lipschitz/max_block_certified": ("max_block_lipschitz", "max_block_lipschitz_certified"),
    "eval/cpu_fraction": ("eval_cpu_fraction",),
    "train/epoch_seconds": ("epoch_seconds",),
}


def metric_value(metrics: Mapping[str, Any], name: str, prefix: str = "") -> Any:
    """Metric ``name`` of a run (``run.data.metrics``, or a row of ``mlflow.search_runs`` with ``prefix="metrics."``),
    under its name or, for a run of an earlier release, its old one; ``None`` where it has neither."""
    for key in (name, *LEGACY_METRIC_NAMES.get(name, ())):
        value = metrics.get(prefix + key)
        if value is not None and value == value:  # not NaN (a column of search_runs that this run lacks)
            return value
    return None


@contextmanager
def _requests_not_retried(timeout_s: int = 5) -> Iterator[None]:
    """MLflow's HTTP requests in the block are tried once, for ``timeout_s`` (by default retried for minutes)."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end_active_run(status: str, tag: str, reason: str, attempts: int = 4) -> None:
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
            retry_tracking_write(lambda: client.set_terminated(run_id, status=status), attempts=attempts)
        except Exception:
            if attempts == 1:  # the store is known to be down: said once, without its traceback
                log.warning("could not record run %s as %s: the tracking store does not answer", run_id, status)
                return
            log.exception("could not record run %s as %s", run_id, status)
    try:
        retry_tracking_write(lambda: client.set_tag(run_id, tag, reason[:5000]), attempts=min(attempts, 2))
        # the description (the run page's first line) says so too, before what it said of the run
        before = client.get_run(run_id).data.tags.get(DESCRIPTION_TAG, "")
        set_description(run_id, f"**{status}**: {reason[:1000]}" + (f"\n\n{before}" if before else ""))
    except Exception:
        log.exception("could not tag run %s with its %s reason", run_id, tag)


@contextmanager
def orchestrator_run(
    experiment_name: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
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
    for key, value in (tags or {}).items():
        retry_tracking_write(partial(client.set_tag, run_id, key, value))
    mark_training_experiment(client.get_run(run_id).info.experiment_id)
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
