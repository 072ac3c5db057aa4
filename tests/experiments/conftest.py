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
