import sqlite3
import threading
import time

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.tracking import log_metrics, tracked_run
from experiments.tracking_store import configure_tracking

HOLD_S = 21.0  # longer than MLflow's own 20 s SQLite busy timeout


def test_a_run_whose_store_refuses_the_failure_tag_still_ends_failed_not_finished(store, monkeypatch):
    """The store failing while the run fails must not leave a run the exit hook ends FINISHED."""

    def locked(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    with pytest.raises(RuntimeError, match="training crashed"), tracked_run("hardening") as run:
        monkeypatch.setattr(MlflowClient, "set_tag", locked)
        monkeypatch.setattr(mlflow, "set_tag", locked)
        raise RuntimeError("training crashed")
    monkeypatch.undo()
    assert mlflow.active_run() is None  # nothing left for the exit hook to end FINISHED
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_metric_writes_outlast_a_lock_held_longer_than_mlflows_busy_timeout(store):
    """Another process holding the SQLite store locked for HOLD_S seconds."""
    configure_tracking()
    with tracked_run("hardening") as run:
        log_metrics({"before": 1.0}, 0)
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:
            db = sqlite3.connect(store / "mlflow.db", timeout=30)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(HOLD_S)
            db.rollback()
            db.close()

        holder = threading.Thread(target=hold_lock)
        holder.start()
        locked.wait()
        started = time.monotonic()
        log_metrics({"during_lock": 2.0}, 1)  # fails after MLflow's 20 s, retried until the lock is gone
        waited = time.monotonic() - started
        holder.join()
    assert waited > 1.0  # it did wait for the lock (a lower bound only: no timing upper bound)
    metrics = MlflowClient().get_run(run.info.run_id).data.metrics
    assert metrics["during_lock"] == 2.0
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


def test_resuming_a_failed_run_moves_its_failure_tag_to_history(store):
    with pytest.raises(RuntimeError), tracked_run("hardening") as run:
        raise RuntimeError("first attempt died")
    with tracked_run("hardening", resume_run_id=run.info.run_id):
        pass
    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert "failure" not in finished.data.tags
    assert finished.data.tags["previous_failure"] == "RuntimeError: first attempt died"
