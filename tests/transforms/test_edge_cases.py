"""Edge cases of the library: each a clear error or a correct empty result, never silent garbage."""

import math

import pytest
import torch

from pipeline.models import iresnet_flow, vector_flow
from pipeline.transforms import ActNorm, ExactLogDet, FixedPointConfig, InverseReport, fixed_point_inverse


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_actnorm_refuses_a_non_finite_first_batch_and_stays_usable(bad):
    layer = ActNorm(3)
    x = torch.randn(8, 3, 4, 4)
    poisoned = x.clone()
    poisoned[2, 1, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(poisoned)
    y, _ = layer(x)  # the refused batch left nothing behind: a clean batch initialises it
    assert torch.isfinite(y).all() and torch.isfinite(layer(torch.randn(2, 3, 4, 4))[0]).all()


def test_actnorm_refuses_an_empty_first_batch():
    with pytest.raises(ValueError, match="non-empty first batch"):
        ActNorm(2)(torch.randn(0, 2, 3, 3))


def test_report_shows_a_nan_residual_that_is_not_first():
    report = InverseReport(iterations=[3, 4], max_residual=[1e-7, float("nan")], n_not_converged=[0, 0])
    assert math.isnan(report.summary()["inverse_max_residual"])
    assert not report.converged


def test_an_infinite_residual_never_counts_as_converged(float64):
    def g(x):
        return 0.5 * x

    y = torch.tensor([[1.0, 2.0], [1e308, 1e308]])  # ||y|| overflows: the tolerance becomes inf
    result = fixed_point_inverse(g, y, FixedPointConfig(max_iterations=50, warn=False))
    assert result.converged.tolist() == [True, False]
    y = torch.tensor([[float("nan"), 0.0], [1.0, 1.0]])
    result = fixed_point_inverse(g, y, FixedPointConfig(max_iterations=50, warn=False))
    assert result.converged.tolist() == [False, True]


def test_empty_batches_give_empty_results():
    flow = iresnet_flow("quick", input_shape=(1, 8, 8), n_blocks=(1, 1), hidden_channels=4)
    x = torch.rand(4, 1, 8, 8) - 0.5
    flow(x)
    for mode in ("train", "eval"):
        flow.train(mode == "train")
        assert flow.log_prob(x[:0]).shape == (0,)
    flow.eval()
    zs, _ = flow(x[:0])
    assert flow.inverse(zs).shape == (0, 1, 8, 8)
    report = InverseReport()
    assert flow.sample(0, report=report).shape == (0, 1, 8, 8)
    toy = vector_flow("quick", n_blocks=2)
    toy(torch.randn(8, 2))
    toy.eval()
    with toy.estimator(ExactLogDet()):
        assert toy.log_prob(torch.randn(0, 2)).shape == (0,)
    assert toy.sample(0).shape == (0, 2)


def test_a_negative_number_of_samples_is_refused():
    flow = vector_flow("quick", n_blocks=1)
    flow(torch.randn(4, 2))
    with pytest.raises(ValueError, match="integer >= 0"):
        flow.sample(-1)
