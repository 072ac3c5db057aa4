"""The tracking store: where runs are kept, reachable and initialised before a run starts, and written to
through the failures a store has (locked, restarting, briefly unreachable).

The default store is an SQLite file in the project (``sqlite:///<project>/mlflow.db``, absolute) with artifacts
beside it in ``<project>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it. A database server (PostgreSQL, ...)
may restart under a running training: a new connection waits for it (:func:`wait_for_database_on_connect`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger("experiments.tracking")


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


class TrackingStoreUnreachable(ConnectionError):
    """The tracking store took none of a run's metrics for longer than the run allows (``tracking_outage_s``): the
    run stops at a checkpoint, to be resumed once the store is back; the message says how."""
