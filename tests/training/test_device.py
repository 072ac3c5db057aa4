import os

import pytest
import torch

from pipeline.training.device import apply_thread_budget, local_workers, thread_budget


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_the_cores_are_divided_among_the_local_workers(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("IRESNET_LOCAL_WORKERS", raising=False)
    assert local_workers() == 1 and thread_budget() == _cores()
    monkeypatch.setenv("IRESNET_LOCAL_WORKERS", "4")
    assert thread_budget() == max(1, _cores() // 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(_cores()))  # torchrun's count wins
    assert thread_budget() == 1
    assert thread_budget(3) == 3  # an explicit budget is kept


def test_the_budget_is_applied_and_bad_values_refused(monkeypatch):
    previous = torch.get_num_threads()
    try:
        assert apply_thread_budget(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        thread_budget(-1)
    monkeypatch.setenv("IRESNET_LOCAL_WORKERS", "zero")
    with pytest.raises(ValueError, match="IRESNET_LOCAL_WORKERS must be a positive integer"):
        local_workers()


def test_deterministic_mode_sets_every_flag_it_needs(monkeypatch):
    from pipeline.training.device import use_deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_without_deterministic_kernels_cudnn_picks_its_fastest_algorithms():
    from pipeline.training.device import use_deterministic_algorithms

    previous = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        use_deterministic_algorithms(False)
        assert torch.backends.cudnn.benchmark  # the shapes of a training are fixed: time them once, keep the best
    finally:
        torch.backends.cudnn.benchmark = previous
