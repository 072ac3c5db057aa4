"""torchrun + DistributedDataParallel for density and classify: two CPU processes on the gloo backend."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.experiments.conftest import runs_of

# IRESNET_DISTRIBUTED_REPEATS=20 runs each distributed test 20 times (the teardown stress run, under load)
REPEATS = range(int(os.environ.get("IRESNET_DISTRIBUTED_REPEATS", "1")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(store: Path, module: str, *args: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        module,
        *args,
        "--device",
        "cpu",
        "--progress",
        "false",
        "--checkpoint-dir",
        str(store / "ckpt"),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def _one_finished_run(experiment: str):
    (run,) = runs_of(experiment)  # rank 0 alone logs: one run, not one per process
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["ddp/world_size"] == 2 and run.data.params["distributed_world_size"] == "2"
    # parameters and buffers (spectral u, v, sigma; ActNorm) are the same on both ranks at the end
    assert m["ddp/replica_max_deviation"] < 1e-6
    return run


@pytest.mark.slow
@pytest.mark.parametrize("repeat", REPEATS)
def test_density_trains_data_parallel_and_logs_once(store, repeat):
    _torchrun(
        store,
        "experiments.density",
        "--dataset",
        "digits8x8",
        "--n-blocks",
        "1 1",
        "--hidden-channels",
        "8",
        "--n-terms",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--eval-max-images",
        "40",
        "--max-passes",
        "3",
        "--se-tol",
        "0.05",
        "--n-samples",
        "8",
        "--variance-repeats",
        "0",
        "--log-every",
        "1",
    )
    run = _one_finished_run("density")
    client = MlflowClient()
    assert "test/bpd" in run.data.metrics and "lipschitz/sigma_max" in run.data.metrics
    steps_per_epoch = 1437 // 64  # digits8x8 has 1437 training images; 64 is the global batch
    history = client.get_metric_history(run.info.run_id, "train/bpd")
    assert [h.step for h in history] == list(range(1, 2 * steps_per_epoch + 1))  # one value per step, not per rank
    ckpt = torch.load(store / "ckpt" / run.info.run_id / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and len(ckpt["rng_per_rank"]) == 2
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])  # own noise
    # the evaluation was sharded over the two ranks and gives what one process computes for the same model
    from experiments.models import load_model
    from pipeline.data import load_dataset
    from pipeline.evaluation import EvalProtocol, evaluate_bits_per_dim

    data = load_dataset("digits8x8")
    alone = evaluate_bits_per_dim(
        load_model(run.info.run_id),
        data.test.subset(torch.arange(40)),
        n_levels=data.n_levels,
        protocol=EvalProtocol(se_tol=0.05, max_passes=3),
        progress=False,
    )
    assert run.data.metrics["test/bpd"] == pytest.approx(alone.bpd, rel=1e-6, abs=1e-6)
    assert run.data.metrics["test/passes"] == alone.n_passes


@pytest.mark.slow
@pytest.mark.parametrize("repeat", REPEATS)
def test_classify_trains_data_parallel(store, repeat):
    _torchrun(
        store,
        "experiments.classify",
        "--dataset",
        "digits8x8",
        "--n-blocks",
        "1 1",
        "--hidden-channels",
        "8 8",
        "--strides",
        "1 2",
        "--injective-padding",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--milestones",
        "",
        "--recon-images",
        "4",
        "--recon-iterations",
        "1 5",
    )
    run = _one_finished_run("classify")
    assert "test/error_percent" in run.data.metrics and run.data.tags["certified_invertible"] in ("true", "false")


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_and_the_run_is_killed(store):
    """torchrun forwards SIGTERM to every rank: rank 0 records the run KILLED, every rank says it stopped."""
    import signal
    import time

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), "-m", "experiments.density", "--dataset", "digits8x8"]
    cmd += ["--n-blocks", "1 1", "--hidden-channels", "8", "--epochs", "500", "--batch-size", "64", "--eval-every"]
    cmd += ["0", "--device", "cpu", "--progress", "false", "--checkpoint-dir", str(store / "ckpt")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((store / "ckpt").glob("*/last.pt")):
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][-3000:]
        time.sleep(0.2)
    agent.send_signal(signal.SIGTERM)
    output = agent.communicate(timeout=300)[0]
    assert agent.returncode != 0
    (run,) = runs_of("density")
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["stopped"], output[-3000:]
    assert f"stopped by SIGTERM: run {run.info.run_id} is marked KILLED" in output
    assert f"stopped by SIGTERM: rank 1 of run {run.info.run_id} stopped" in output
