from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


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

    a = torch.load(checkpoint_dir / run_a / "last.pt", weights_only=True)["model"]
    b = torch.load(checkpoint_dir / run_b / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
