import sqlite3
import threading
import time

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.metric_logging import log_metrics
from experiments.tracking import tracked_run
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


# --- a tracking server that goes away ------------------------------------------------------------
@pytest.fixture
def tracking_server(tmp_path, monkeypatch):
    """A real ``mlflow server`` (SQLite behind it) that a test can kill and start again on the same port and store;
    MLflow's client tries each request once (its default retries for minutes would only slow the test)."""
    from tests.servers import free_port, kill, mlflow_server

    port, backend = free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    class Server:
        proc = None
        starts = 0

        def start(self):
            self.starts += 1
            self.proc = mlflow_server(backend, tmp_path / "artifacts", port, tmp_path / f"server-{self.starts}.log")

        def kill(self):
            kill(self.proc)

    server = Server()
    server.start()
    mlflow.set_tracking_uri(uri)
    yield server
    server.kill()


def _epochs_logged(run_id: str) -> list[int]:
    return sorted(int(m.value) for m in MlflowClient().get_metric_history(run_id, "train/epoch"))


def test_a_tracking_server_that_goes_away_for_epochs_stalls_nothing_and_loses_nothing(store, tracking_server):
    from experiments import density
    from tests.experiments.test_density import TINY

    def outage(epoch, metrics):  # the server dies after epoch 1 and is back after epoch 3: training goes on between
        if epoch == 1:
            tracking_server.kill()
        elif epoch == 3:
            tracking_server.start()

    cfg = density.config_from_preset("quick", **{**TINY, "epochs": 4}, checkpoint_dir=str(store / "ckpt"))
    run_id = density.run(cfg, on_epoch_end=outage)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and tracking_server.starts == 2
    assert _epochs_logged(run_id) == [1, 2, 3, 4]  # epochs 2 and 3 trained while the server was down
    sigma = next(k for k in run.data.metrics if k.startswith("weights/sigma_"))
    assert len(client.get_metric_history(run_id, sigma)) == 4  # the spectral estimates of every epoch
    assert not (store / "ckpt" / run_id / "unwritten_metrics.jsonl").exists()


def test_a_tracking_server_gone_for_good_stops_the_run_at_a_checkpoint_and_the_resume_writes_what_was_kept(
    store, tracking_server, caplog
):
    from experiments import density
    from tests.experiments.test_density import TINY

    def die(epoch, metrics):  # after epoch 1
        if epoch == 1:
            tracking_server.kill()

    ckpt = store / "ckpt"
    args = ["--checkpoint-dir", str(ckpt), "--tracking-outage-s", "0.001", "--epochs", "4"]
    for key, value in TINY.items():
        if key != "epochs":
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            args += [f"--{key.replace('_', '-')}", text]
    entry = density.EntryPoint(density.DensityConfig, density.PRESETS, lambda c: density.run(c, on_epoch_end=die))
    assert entry.main(args) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    run_id = line.split("--resume ")[1].split()[0]
    assert "TrackingStoreUnreachable: the tracking store http://127.0.0.1:" in line and "checkpoint" in line
    spool = ckpt / run_id / "unwritten_metrics.jsonl"
    assert spool.exists() and f"kept in {spool}" in line
    stopped_at = torch.load(ckpt / run_id / "last.pt", weights_only=True)["epoch"]
    assert 1 <= stopped_at < 4  # stopped at the first checkpoint past the limit, not at the end

    tracking_server.start()
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(ckpt), "--tracking-outage-s", "600"]) == 0
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _epochs_logged(run_id) == [1, 2, 3, 4]  # each epoch once: nothing lost, nothing twice
    sigma = next(k for k in client.get_run(run_id).data.metrics if k.startswith("weights/sigma_"))
    assert sorted(m.step for m in client.get_metric_history(run_id, sigma)) == sorted(
        {m.step for m in client.get_metric_history(run_id, "train/epoch")}
    )
    assert not spool.exists()
