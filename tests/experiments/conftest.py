import os
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store for the test; `python` on PATH is this interpreter."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # `mlflow run --env-manager local` calls `python` from PATH: make it this interpreter, as an activated venv does
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def runs_of(experiment: str) -> list:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else MlflowClient().search_runs([exp.experiment_id])


class SimulatedCrash(RuntimeError):
    pass


@pytest.fixture
def crash_after_epoch(monkeypatch):
    """``crash_after_epoch(k)``: the next run dies right after writing its epoch-k checkpoint."""
    import pipeline.training.loop as loop

    original = loop.save_checkpoint

    def arm(epoch: int) -> None:
        def save_then_crash(path, state):
            original(path, state)
            if state["epoch"] == epoch:
                monkeypatch.setattr(loop, "save_checkpoint", original)
                raise SimulatedCrash(f"simulated crash after the epoch-{epoch} checkpoint")

        monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)

    return arm


def assert_same_final_parameters(checkpoint_dir: Path, run_a: str, run_b: str) -> None:
    import torch

    a = torch.load(checkpoint_dir / run_a / "last.pt", weights_only=False)["model"]
    b = torch.load(checkpoint_dir / run_b / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
