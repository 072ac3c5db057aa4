import pytest
import torch

from pipeline.training.numerics import denormals_flushed_in_every_thread, flush_denormals


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    assert flush_denormals(True)  # as an entry point run earlier in the same process leaves it
    torch.set_num_threads(2)
    torch.full((4_000_000,), 1.0) * 1.0  # the OpenMP team exists before flushing: its workers do not inherit
    yield
    flush_denormals(False)
    torch.set_num_threads(previous)


def test_flushing_holds_in_every_intra_op_thread(two_threads):
    import sklearn.datasets  # noqa: F401 - brings its own libgomp: the one to reach is torch's

    assert flush_denormals(False)  # off in every thread, also in workers that were flushed
    assert not denormals_flushed_in_every_thread()
    torch.set_flush_denormal(True)  # torch's own switch reaches the calling thread only
    assert not denormals_flushed_in_every_thread()
    assert flush_denormals(True)
    assert denormals_flushed_in_every_thread()
    assert flush_denormals(False) and not denormals_flushed_in_every_thread()


def test_flushing_changes_nothing_a_metric_can_see(two_threads):
    """Values below ~1.2e-38 become zero: results move by less than that per element."""
    torch.manual_seed(0)
    a, b = torch.randn(1_000_000) * 1e-20, torch.randn(1_000_000) * 1e-19  # products ~1e-39: subnormal
    results = []
    for enabled in (False, True):
        assert flush_denormals(enabled)
        results.append(a * b)
    flush_denormals(False)  # the checks below must see subnormals as they are (DAZ reads them as zero)
    plain, flushed = results
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain != 0) & (plain.abs() < tiny)).any()  # the case really has subnormals
    assert not ((flushed != 0) & (flushed.abs() < tiny)).any()
    assert (plain - flushed).abs().max() < tiny
    assert float(plain.double().sum() - flushed.double().sum()) == pytest.approx(0.0, abs=plain.numel() * tiny)
