"""Team scale on a real PostgreSQL server: sweep workers with heartbeats, a tracking server, the dashboard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from experiments import sweep
from experiments.tracking_store import PROJECT_ROOT
from tests.experiments.conftest import runs_of
from tests.experiments.test_sweep import TINY_DENSITY, TINY_SPACE
from tests.servers import free_port, mlflow_server, serve


def _sweep_on_postgres(
    store: Path, server, monkeypatch, study: str, *, n_trials: int, grace_s: int, epochs: int
) -> tuple[str, list[str]]:
    """Optuna's trials and MLflow's runs both on the real PostgreSQL server, each in its own database (both keep
    their schema version in an `alembic_version` table); the study's database URL and a sweep worker's command."""
    db = server.create_database()
    tracking = server.create_database()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    space = store / "space.json"
    space.write_text(json.dumps(TINY_SPACE))
    return db, [
        sys.executable, "-m", "experiments.sweep", "--target", "density", "--storage", db, "--study-name", study,
        "--n-trials", str(n_trials), "--space-file", str(space), "--pruner", "none", "--heartbeat-interval", "1",
        "--grace-period", str(grace_s), "--checkpoint-dir", str(store / "ckpt"),
        "--target-overrides", TINY_DENSITY.replace("epochs=2", f"epochs={epochs}") + " log_every=1",
    ]  # fmt: skip


@pytest.mark.slow
def test_a_killed_worker_is_failed_by_its_heartbeat_and_the_study_still_completes(store, postgres_server, monkeypatch):
    """kill -9 one worker mid-trial: its trial ends FAIL and its MLflow runs FAILED (with a reason), the other
    workers fill its slot, exactly --n-trials trials complete, nothing stays RUNNING, and trials and MLflow
    child runs match one to one."""
    import signal
    import time

    db, args = _sweep_on_postgres(store, postgres_server, monkeypatch, "hb", n_trials=3, grace_s=3, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(seed: int, extra: tuple = ()) -> subprocess.Popen:
        return subprocess.Popen(
            [*args, "--seed", str(seed), *extra], env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    # the victim trains long trials (many epochs): it is surely mid-trial when killed
    victim = start(0, ("--target-overrides", TINY_DENSITY.replace("epochs=2", "epochs=50")))
    storage = optuna.storages.RDBStorage(db)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name="hb", storage=storage).trials
        except KeyError:
            trials = []
        if any(t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
            break
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    workers = [start(seed) for seed in (1, 2)]
    outputs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs

    trials = optuna.load_study(study_name="hb", storage=storage).trials
    states = [t.state for t in trials if not t.user_attrs.get("excess_claim")]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in trials]
    dead = [t for t in trials if t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("excess_claim")]
    assert len(dead) == 1
    client = MlflowClient()
    dead_child = client.get_run(dead[0].user_attrs["mlflow_run_id"])
    assert dead_child.info.status == "FAILED" and "worker died" in dead_child.data.tags["failure"]
    assert client.get_run(dead[0].user_attrs["mlflow_parent_run_id"]).info.status == "FAILED"
    # one to one: every trial that trained has its child run, tagged with the trial's number
    children = [r for r in runs_of("sweep") if "mlflow.parentRunId" in r.data.tags]
    linked = {t.user_attrs["mlflow_run_id"]: t.number for t in trials if "mlflow_run_id" in t.user_attrs}
    assert {r.info.run_id: int(r.data.tags["optuna_trial"]) for r in children} == linked
    assert all(r.info.status != "RUNNING" for r in runs_of("sweep"))


@pytest.mark.slow
def test_a_database_restart_mid_sweep_is_survived_and_nothing_is_recorded_twice(store, postgres_server, monkeypatch):
    """The server restarts (fast mode: every connection cut) while two workers train their trials: they
    reconnect, the trials complete, nothing is failed for a missed heartbeat, and every trial has exactly one
    FINISHED child run whose metrics were each logged once."""
    import time

    # each worker runs one trial (--worker-trials 1): started together, one worker could finish its trial and take
    # the other before the second worker was up, and nothing was restarted mid-trial; the second starts once the
    # first is training, so both are mid-trial at the restart however long a start-up takes
    db, args = _sweep_on_postgres(store, postgres_server, monkeypatch, "rs", n_trials=2, grace_s=30, epochs=30)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [store / f"worker{seed}.log" for seed in (0, 1)]  # files: a full pipe would block a worker
    storage = optuna.storages.RDBStorage(db)

    def start(seed: int, epochs: int) -> subprocess.Popen:
        longer = ["--target-overrides", TINY_DENSITY.replace("epochs=2", f"epochs={epochs}") + " log_every=1"]
        return subprocess.Popen(
            [*args, "--seed", str(seed), "--worker-trials", "1", *longer], env=env, cwd=PROJECT_ROOT,
            stdout=logs[seed].open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_until_training(n: int) -> list:
        """The RUNNING trials once ``n`` of them are linked to an MLflow run that has logged a training step."""
        deadline, running = time.monotonic() + 600, []
        while time.monotonic() < deadline:
            if any(w.poll() is not None for w in workers):
                break  # a worker ended before its trial trained: the assertion below shows why
            try:
                trials = optuna.load_study(study_name="rs", storage=storage).trials
            except KeyError:
                trials = []
            running = [
                t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
            ]
            if len(running) == n and all(
                MlflowClient().get_metric_history(t.user_attrs["mlflow_run_id"], "train/bpd") for t in running
            ):
                break
            time.sleep(0.2)
        return running

    workers = [start(0, epochs=60)]  # the first trial outlasts the second worker's start-up
    wait_until_training(1)
    workers.append(start(1, epochs=30))
    running = wait_until_training(2)
    storage.remove_session()
    storage.engine.dispose()  # this test's own connections would keep nothing alive, but close them anyway
    assert len(running) == 2, ["the workers did not reach their trials", *(log.read_text()[-3000:] for log in logs)]
    postgres_server.restart()
    assert all(w.poll() is None for w in workers), "a worker finished before the restart: nothing was tested"
    try:
        for w in workers:
            w.wait(timeout=600)
    finally:
        for w in workers:
            w.kill()
    outputs = [log.read_text() for log in logs]
    assert all(w.returncode == 0 for w in workers), outputs

    trials = optuna.load_study(study_name="rs", storage=optuna.storages.RDBStorage(db)).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, [t.user_attrs for t in trials]
    client = MlflowClient()
    children = [r for r in runs_of("sweep") if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/bpd")]
        assert len(steps) == len(set(steps)) > 0  # each step's metric logged once, retries included
    assert all(r.info.status == "FINISHED" for r in runs_of("sweep"))


@pytest.mark.slow
def test_a_lab_on_one_postgresql_a_tracking_server_and_the_dashboard(store, postgres_server, monkeypatch, tmp_path):
    """`mlflow server` on PostgreSQL with served artifacts; density, classify, a sweep (its study on PostgreSQL)
    and the report through it; the model reloads through the server; optuna-dashboard serves the study."""
    import urllib.request

    import torch

    from analysis import report
    from experiments import classify, density
    from experiments.models import load_model
    from tests.experiments.test_classify import TINY as TINY_CLASSIFY
    from tests.experiments.test_density import TINY as TINY_DENSITY_CFG

    backend, study_db = postgres_server.create_database(), postgres_server.create_database()
    port = free_port()
    server = mlflow_server(backend, tmp_path / "artifacts", port, tmp_path / "mlflow-server.log")
    dashboard = None
    try:
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        ckpt = str(store / "ckpt")
        density_id = density.run(
            density.config_from_preset("quick", **TINY_DENSITY_CFG, checkpoint_dir=ckpt, register_model="lab-flow")
        )
        classify_id = classify.run(classify.config_from_preset("quick", **TINY_CLASSIFY, checkpoint_dir=ckpt))
        space = tmp_path / "space.json"
        space.write_text(json.dumps(TINY_SPACE))
        sweep_id = sweep.run(
            sweep.config_from_preset(
                "quick", target="density", target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1"),
                n_trials=2, space_file=str(space), storage=study_db, study_name="lab", checkpoint_dir=ckpt,
                pruner="none",
            )
        )  # fmt: skip
        report_id = report.run(report.ReportConfig(output_dir=str(tmp_path / "report")))

        client = MlflowClient()
        for run_id in (density_id, classify_id, sweep_id, report_id):
            assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(density_id).data.metrics["test/bpd"] > 0
        assert "samples_T1.png" in {a.path for a in client.list_artifacts(density_id)}
        assert (tmp_path / "artifacts").exists()  # artifacts went through the server to its destination
        model = load_model(density_id)  # downloaded through the server and rebuilt
        assert torch.isfinite(model.log_prob(torch.rand(2, *model.input_shape) - 0.5)).all()
        # the Model Registry on PostgreSQL: the registered version loads by name, as a network and as pyfunc
        assert client.get_model_version("lab-flow", "1").run_id == density_id
        registered = load_model("models:/lab-flow/1")
        pairs = zip(model.state_dict().values(), registered.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)
        images = np.zeros((2, *model.input_shape), np.uint8)
        assert len(mlflow.pyfunc.load_model("models:/lab-flow/1").predict(images)) == 2
        children = [r for r in runs_of("sweep") if r.data.tags.get("mlflow.parentRunId") == sweep_id]
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert client.get_run(report_id).data.metrics["tables/table4_rows"] >= 1

        dash_port = free_port()
        dashboard = serve(
            ["optuna-dashboard", study_db, "--host", "127.0.0.1", "--port", str(dash_port)],
            f"http://127.0.0.1:{dash_port}/", tmp_path / "dashboard.log",
        )  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/studies", timeout=10) as response:
            studies = json.loads(response.read())["study_summaries"]
        (lab,) = [s for s in studies if s["study_name"] == "lab"]
        with urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/studies/{lab['study_id']}", timeout=10) as r:
            trials = json.loads(r.read())["trials"]
        assert len(trials) == 2 and {t["state"] for t in trials} == {"Complete"}
        mlflow_ids = {a["value"] for t in trials for a in t["user_attrs"] if a["key"] == "mlflow_run_id"}
        assert mlflow_ids == {r.info.run_id for r in children}
    finally:
        server.terminate()
        server.wait(timeout=30)
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
