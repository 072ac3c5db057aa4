"""MLflow plumbing shared by the entry points.

The default store is an SQLite file in the project (``sqlite:///<project>/mlflow.db``, absolute)
with artifacts beside it in ``<project>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it.
When an entry point is launched by ``mlflow run``, MLflow hands it a run (``MLFLOW_RUN_ID``) and
that run is used.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_tracking_uri() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the project's SQLite store; return the URI.

    A new store's schema is created by one process at a time: several processes starting at once (sweep
    workers) would otherwise race on its migration (SQLite: a file lock; PostgreSQL: an advisory lock;
    other databases: the losers retry once the winner is done).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from offline machines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model download otherwise
    wait_for_database_on_connect()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri not in _CHECKED_STORES:
        check_store_reachable(uri)
        _CHECKED_STORES.add(uri)
    if uri.startswith("sqlite:///"):
        _initialize_sqlite_store(Path(uri.removeprefix("sqlite:///")))
    elif _scheme(uri) in DATABASE_SCHEMES:
        _initialize_database_store(uri)
    return uri


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


DATABASE_RECONNECT_S = 60.0  # how long a new connection waits for a database server that is (re)starting
_reconnecting = contextvars.ContextVar("reconnecting", default=True)
_installed: list[bool] = []


def wait_for_database_on_connect() -> None:
    """Make every new database connection of this process wait for a server that is down or restarting.

    SQLAlchemy's ``pool_pre_ping`` (MLflow's store and this project's Optuna storage set it) already replaces
    a pooled connection that a server restart has cut; with this, the replacement waits up to
    :data:`DATABASE_RECONNECT_S` for the server instead of failing the run, so a restart or a failover of the
    tracking or study database passes unnoticed by a training. Installed once per process (a SQLAlchemy
    event on every engine); SQLite is untouched, and the start-up check of a store still fails at once.
    """
    if _installed:
        return
    import sqlalchemy

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "do_connect", _connect_waiting_for_server)
    _installed.append(True)


def _connect_waiting_for_server(dialect, conn_rec, cargs, cparams):
    if dialect.name == "sqlite" or not _reconnecting.get():
        return None  # SQLAlchemy connects as usual
    deadline, delay = time.monotonic() + DATABASE_RECONNECT_S, 0.5
    while True:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable (%s); connecting again in %.1f s", str(exc).splitlines()[0][:200], delay)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


_CHECKED_STORES: set[str] = set()
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def check_store_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """One quick connection to a tracking server or database; ValueError naming the store if it fails.

    MLflow itself retries an unreachable database for about 100 s before its error; a wrong URI
    should say so at once.
    """
    scheme = _scheme(uri)
    try:
        if scheme in ("http", "https"):
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                pass
        elif scheme in DATABASE_SCHEMES:
            import sqlalchemy

            connect_args = {"connect_timeout": int(timeout_s)} if scheme in ("postgresql", "mysql") else {}
            engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
            token = _reconnecting.set(False)  # a wrong or dead URI is said at once
            try:
                with engine.connect():
                    pass
            finally:
                _reconnecting.reset(token)
                engine.dispose()
    except Exception as exc:
        shown = f"{uri.split('://', 1)[0]}://***@{uri.rsplit('@', 1)[1]}" if "@" in uri else uri  # no password
        raise ValueError(
            f"the tracking store {shown} is unreachable: {' '.join(str(exc).split())[:300]}. "
            "Start it, or fix MLFLOW_TRACKING_URI"
        ) from None


def _initialize_sqlite_store(db: Path) -> None:
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient().search_experiments(max_results=1)  # creates and migrates the schema once
        except Exception as exc:
            if _transient(exc):  # locked: the callers' retries wait for it
                raise
            raise ValueError(
                f"the tracking store sqlite:///{db} cannot be read ({str(exc).splitlines()[0][:200]}): the file is "
                "damaged or is not an MLflow database. Move it aside (a new store is created in its place), or "
                "point MLFLOW_TRACKING_URI at another store"
            ) from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


SCHEMA_LOCK_KEY = 0x1DE5_0F10  # the advisory lock this project's processes take around MLflow's schema creation


def _initialize_database_store(uri: str) -> None:
    """Create or migrate MLflow's schema in a database once, whoever starts first (no-op when it is there)."""
    import sqlalchemy

    def initialize() -> None:
        MlflowClient().search_experiments(max_results=1)

    if _scheme(uri) == "postgresql":
        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({SCHEMA_LOCK_KEY})"))
                try:
                    initialize()
                finally:
                    connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({SCHEMA_LOCK_KEY})"))
        finally:
            engine.dispose()
    else:  # a loser of the race fails on a duplicate table or version row, then finds the schema complete
        retry_tracking_write(initialize, first_delay_s=1.0)


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
    system = {"log_system_metrics": True} if log_system_metrics else {}
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
        run = mlflow.start_run(run_id=resume_run_id, **system)
        for key in ("failure", "stopped"):  # the interruption is history now: keep it, but not as the run's state
            if key in previous.data.tags:
                client.set_tag(resume_run_id, f"previous_{key}", previous.data.tags[key])
                client.delete_tag(resume_run_id, key)
    elif launched_run and mlflow.active_run() is None:
        run = mlflow.start_run(run_id=launched_run, **system)
        # claimed: a later start_run(nested=True) would otherwise silently resume this run again
        os.environ.pop("MLFLOW_RUN_ID", None)
    elif mlflow.active_run() is not None:
        parent = mlflow.active_run()
        run = mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=run_name, nested=True, **system)
    else:
        run = mlflow.start_run(experiment_id=experiment_id(experiment_name), run_name=run_name, **system)
    try:
        if not resume_run_id:
            for hook in list(_RUN_START_HOOKS):
                hook(run.info.run_id)
        yield run
    except (KeyboardInterrupt, RunStopped) as exc:
        _end_active_run("KILLED", "stopped", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if not hasattr(exc, "stop_hint"):  # what the entry point says of the stop (an inner run's, if any)
            exc.stop_hint = f"run {run.info.run_id} is marked KILLED"  # type: ignore[attr-defined]
        raise
    except BaseException as exc:
        _end_active_run("FAILED", "failure", f"{type(exc).__name__}: {exc}")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def retry_tracking_write(write: Callable[[], Any], *, attempts: int = 4, first_delay_s: float = 2.0) -> Any:
    """``write()``, retried with exponential backoff when the store fails (locked, briefly unreachable).

    Only such transient failures are retried; an error about the write itself (a param logged before with
    another value) is raised at once.
    """
    for attempt in range(attempts):
        try:
            return write()
        except Exception as exc:
            if attempt == attempts - 1 or not _transient(exc):
                raise
            delay = first_delay_s * 2**attempt
            log.warning("tracking write failed (%s); retrying in %.0f s", exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


TRANSIENT_ERRORS = ("OperationalError", "InterfaceError", "DisconnectionError", "ConnectionError", "Timeout")
TRANSIENT_MESSAGES = ("operationalerror", "database is locked", "connection", "timed out", "temporarily unavailable")


def _transient(exc: BaseException) -> bool:
    """A locked, restarting or unreachable store (from MLflow's wrapped errors too), not a refused write."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(name in type(seen).__name__ for name in TRANSIENT_ERRORS):
            return True
        if any(text in str(seen).lower() for text in TRANSIENT_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    run_id = mlflow.active_run().info.run_id
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


CONFIG_PREFIX = "config."


def log_config(config: Any) -> None:
    """Log the *resolved* configuration dataclass as ``config.<field>`` params.

    Under ``mlflow run`` the CLI has already logged the raw entry-point parameters under their bare
    names (an unset one as ``''``); the resolved values get their own prefix, so runs started either
    way carry the same ``config.*`` params.
    """
    from dataclasses import asdict

    log_params_flat({k: v for k, v in asdict(config).items() if k not in ("resume", "progress")}, CONFIG_PREFIX)

