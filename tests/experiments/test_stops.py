"""Every way a run is stopped is recorded as a stop, and the run can go on.

The signal tests run real processes (``python -m experiments.density`` / ``experiments.sweep``) and wait for
what they observe (a checkpoint on disk, a lease held), never for a fixed time, so a loaded machine only makes
them slower. Each process gets one thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import density
from experiments.study import counts_toward_budget
from experiments.tracking_store import PROJECT_ROOT
from pipeline.training.checkpoint import LEASE_FILE, RunInUse, checkpoint_lease, load_checkpoint
from tests.experiments.conftest import runs_of
from tests.experiments.test_density import TINY

WAIT_S = 240.0  # for a subprocess to reach its first checkpoint on a loaded 2-core machine


def _argv(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [f"--{key.replace('_', '-')}", text]
    return args


def _start(module: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv, "--threads", "1"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {what} within {WAIT_S} s")
        time.sleep(0.1)


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/last.pt"))


def _stopped(process: subprocess.Popen, sig: int) -> tuple[int, str]:
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=WAIT_S)
    return process.returncode, stderr


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_sigterm_stops_a_density_run_as_killed_and_a_live_run_is_not_resumed_twice(store, caplog):
    ckpt = store / "ckpt"
    # many epochs: the run is stopped long before it could finish
    process = _start("experiments.density", _argv({**TINY, "epochs": 500, "eval_every": 0, "checkpoint_dir": ckpt}))
    _wait_for(lambda: _checkpoints(ckpt), process, "checkpoint")
    (path,) = _checkpoints(ckpt)
    run_id = path.parent.name
    client = MlflowClient()

    # a second process resuming the live run is refused, and the live run is left as it is
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(ckpt), "--progress", "false"]) == 2
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "is still training" in error.getMessage() and f"pid {process.pid}" in error.getMessage()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert "stopped" not in client.get_run(run_id).data.tags and "failure" not in client.get_run(run_id).data.tags

    code, stderr = _stopped(process, signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr
    (line,) = _error_lines(stderr)
    assert "stopped by SIGTERM" in line and f"--resume {run_id}" in line
    # `python -m` names the run when it starts (the module's logger passes as __main__ too)
    assert f"run {run_id} started (continue it after an interruption with --resume {run_id})" in stderr
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "SIGTERM" in run.data.tags["stopped"]
    assert load_checkpoint(path)["epoch"] >= 1  # the last checkpoint is intact
    assert not list(path.parent.glob(".last.pt.*"))  # no half-written file left
    # the lease died with the process: the run can be resumed now
    resumed = density.config_for_resume(run_id, checkpoint_dir=str(ckpt))
    assert resumed.resume == run_id
    with checkpoint_lease(path.parent):
        pass


def test_the_lease_is_exclusive_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.training.checkpoint import checkpoint_lease\n"
            f"with checkpoint_lease({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)",
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"pid {holder.pid} on "), checkpoint_lease(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the operating system drops the lock
        holder.wait()
    with checkpoint_lease(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / LEASE_FILE).read_text()
    assert (tmp_path / LEASE_FILE).read_text() == ""


def test_ctrl_c_ends_the_run_killed_with_one_line_and_no_traceback(store, caplog, monkeypatch):
    import pipeline.models.base as base

    original = base.FlowModel.prior_log_prob

    def interrupted(self, zs):
        if torch.is_grad_enabled():
            raise KeyboardInterrupt
        return original(self, zs)

    monkeypatch.setattr(base.FlowModel, "prior_log_prob", interrupted)
    assert density.main(_argv({**TINY, "checkpoint_dir": store / "ckpt"})) == 130
    (run,) = runs_of("density")
    assert run.info.status == "KILLED" and run.data.tags["stopped"] == "KeyboardInterrupt"
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage() == (
        f"stopped by Ctrl-C: run {run.info.run_id} is marked KILLED with its last checkpoint kept; continue it with "
        f"--resume {run.info.run_id}"
    )


@pytest.mark.slow
def test_sigterm_stops_a_sweep_worker_and_frees_its_trial_for_a_retry(store):
    from tests.experiments.test_sweep import TINY_DENSITY, TINY_SPACE

    space = store / "space.json"
    space.write_text(__import__("json").dumps(TINY_SPACE))
    storage = f"sqlite:///{store / 'optuna.db'}"
    ckpt = store / "ckpt"
    argv = _argv(
        {
            "target_overrides": TINY_DENSITY.replace("epochs=2", "epochs=500"),
            "n_trials": 2,
            "space_file": space,
            "storage": storage,
            "checkpoint_dir": ckpt,
            "pruner": "none",
        }
    )
    process = _start("experiments.sweep", argv)
    _wait_for(lambda: _checkpoints(ckpt), process, "checkpoint of the first trial")
    code, stderr = _stopped(process, signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr
    (line,) = _error_lines(stderr)
    assert "stopped by SIGTERM: trial 0 of study 'iresnet-sweep' is marked FAIL" in line
    assert "queued to be tried again" in line
    study = optuna.load_study(study_name="iresnet-sweep", storage=storage)
    first, retry = study.get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL and not counts_toward_budget(first)  # its slot is free
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == first.params
    client = MlflowClient()
    for run_id in (first.user_attrs["mlflow_run_id"], first.user_attrs["mlflow_parent_run_id"]):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["stopped"], run_id


def test_a_filesystem_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with checkpoint_lease(tmp_path):
        pass
    assert "cannot lease" in caplog.text and "would not be refused" in caplog.text
