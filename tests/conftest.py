import os
import random
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline.training.device import LOCAL_WORKERS_ENV, thread_budget, usable_cores

MAX_TEST_WORKERS = 4  # beyond this, the PostgreSQL and subprocess tests gain nothing from more workers


def pytest_xdist_auto_num_workers(config):
    return max(1, min(usable_cores(), MAX_TEST_WORKERS))


def pytest_configure(config):
    """Under pytest-xdist, each worker, and every process it starts, takes its share of the cores: PyTorch processes
    that each use every core collapse one another (the library's thread budget reads the same variable)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault(LOCAL_WORKERS_ENV, workers)
        threads = thread_budget()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def float64():
    """Run the test's maths in double precision."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def _empty_sqlite_store(tmp_path_factory) -> Path:
    """An empty tracking store with MLflow's tables, made once per test process: creating the tables (the schema's
    migrations) costs about 1.5 CPU-s, copying the file a few ms."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    cwd = Path.cwd()
    os.chdir(path.parent)  # the Default experiment's artifacts go to ./mlruns as the store is made: not the checkout's
    try:
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, _empty_sqlite_store):
    """A fresh SQLite tracking store for the test; `python` on PATH is this interpreter."""
    shutil.copyfile(_empty_sqlite_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # `mlflow run --env-manager local` calls `python` from PATH: make it this interpreter, as an activated venv does
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
