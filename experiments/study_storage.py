"""Where a study lives: a journal file or a database (SQLite, PostgreSQL, ...) that outlives a server restart.

Built from Optuna's public storages. A database storage checks pooled connections before use
(``pool_pre_ping``: a restart leaves them dead) and every new connection waits for a server that is down or
restarting (:func:`~experiments.tracking_store.wait_for_database_on_connect`, as MLflow's store does), so the calls
of a running study pass a restart unnoticed. Heartbeats (database storages only) are Optuna's:
a trial whose worker stopped beating for ``grace_period`` is failed by the next worker.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from experiments.tracking_store import PROJECT_ROOT, wait_for_database_on_connect

log = logging.getLogger("experiments.sweep")

SCHEMA_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # ~30 s: workers starting together, or a server starting up

DeadTrialHandler = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage for a database server: connections that survive a restart, a schema race lost
    gracefully, and a heartbeat thread that never dies of one failed beat."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        wait_for_database_on_connect()  # a cut connection is replaced once the server is back
        engine_kwargs = {"pool_pre_ping": True, **kwargs.pop("engine_kwargs", {})}
        for delay in (*SCHEMA_RETRY_DELAYS_S, None):
            try:
                super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)
                return
            except Exception as exc:  # workers starting together race on creating the schema; a loser finds it done
                if delay is None or not _schema_race_or_unreachable(exc):
                    raise
                log.warning("study storage not ready (%s); retrying in %.0f s", type(exc).__name__, delay)
                time.sleep(delay)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # the next beat tries again; the grace period is the limit
            log.warning("heartbeat of trial %d not recorded (%s); retrying at the next beat", trial_id, exc)


def _schema_race_or_unreachable(exc: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(
        exc,
        (
            optuna.exceptions.StorageInternalError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.ProgrammingError,
        ),
    )


def open_storage(
    spec: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_dead_trial: DeadTrialHandler | None = None,
) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (``journal:PATH``), or a database URL (default: the project's
    SQLite file) with heartbeats every ``heartbeat_interval`` s when given, ``on_dead_trial`` called for a
    trial found without heartbeat for ``grace_period`` s (default 3 intervals)."""
    try:
        if spec.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
        url = spec or f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"
        storage_class = optuna.storages.RDBStorage if url.startswith("sqlite") else ReconnectingRDBStorage
        if heartbeat_interval is None:
            return storage_class(url)
        with warnings.catch_warnings():  # heartbeats are flagged experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return storage_class(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or 3 * heartbeat_interval,
                heartbeat_stale_trial_callback=on_dead_trial,
            )
    except Exception as exc:  # an unknown scheme, a missing driver, a file that is no database, a dead server
        shown = f"{spec.split('://', 1)[0]}://***@{spec.rsplit('@', 1)[1]}" if "@" in spec else spec or "(default)"
        raise ValueError(
            f"the study storage {shown} cannot be opened ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "use journal:PATH, sqlite:///PATH or a database URL such as postgresql+psycopg://user@host/db"
        ) from None


def has_heartbeats(storage: optuna.storages.BaseStorage) -> bool:
    """Whether trials of this storage send heartbeats (a database storage opened with an interval)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None
