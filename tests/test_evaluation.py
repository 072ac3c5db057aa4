"""The honest bits/dim protocol: Theorem-3 series or unbiased roulette, both against the exact log-det."""

import math

import pytest
import torch

from pipeline.data import load_dataset
from pipeline.data.preprocessing import dequantize
from pipeline.evaluation import EvalProtocol, chunked_standard_error, evaluate_bits_per_dim
from pipeline.metrics import bits_per_dim
from pipeline.models import FlowArchitecture, IResNetFlow
from pipeline.transforms import ExactLogDet, PowerSeriesLogDet, RussianRouletteLogDet


@pytest.fixture(scope="module")
def trained():
    """A small flow on the 8x8 digits, trained a little at c = 0.97 (block Lipschitz bounds near 0.9)."""
    torch.manual_seed(0)
    data = load_dataset("digits8x8")
    model = IResNetFlow(FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(2, 2), hidden_channels=16, coeff=0.97))
    with torch.no_grad():
        model(dequantize(data.train.images[:256], data.n_levels))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        x = dequantize(data.train.images[torch.randint(len(data.train), (64,))], data.n_levels)
        loss = model.bits_per_dim(x, n_levels=data.n_levels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


def _exact_bpd(model, data, n_images: int) -> float:
    torch.manual_seed(1234)  # evaluate_bits_per_dim's dequantisation noise for its first batch
    x = dequantize(data.test.images[:n_images], data.n_levels)
    with torch.no_grad(), model.estimator(ExactLogDet()):
        return float(bits_per_dim(model.log_prob(x), model.dim, data.n_levels).mean())


def test_auto_chooses_the_unbiased_roulette_where_theorem_3_is_costly(trained):
    model, _ = trained
    lips, dims = model.lipschitz_bounds(method="certified"), model.block_dims()
    estimator, bias = EvalProtocol().choose_estimator(lips, dims, model.dim)
    assert isinstance(estimator, RussianRouletteLogDet) and bias == 0.0
    assert estimator.p == pytest.approx((1 - max(lips) ** 2) / 2)  # finite variance with a margin
    # a loose tolerance at a small Lipschitz bound: the truncated series is cheaper and is kept
    series, bias = EvalProtocol(bias_tol=0.1).choose_estimator([0.3] * len(dims), dims, model.dim)
    assert isinstance(series, PowerSeriesLogDet) and 0 < bias < 0.1


@pytest.mark.parametrize("estimator", ["russian_roulette", "power_series"])
def test_both_protocols_agree_with_the_exact_log_det(trained, estimator):
    model, data = trained
    n = 100
    protocol = EvalProtocol(estimator=estimator, bias_tol=2e-3, se_tol=2e-3, max_passes=40, max_terms=400)
    est = evaluate_bits_per_dim(
        model, data.test.subset(torch.arange(n)), n_levels=data.n_levels, batch_size=n, protocol=protocol,
        progress=False,
    )  # fmt: skip
    exact = _exact_bpd(model, data, n)
    assert est.unbiased == (estimator == "russian_roulette")
    assert est.converged
    # within four standard errors plus the (bounded) truncation bias
    assert abs(est.bpd - exact) < 4 * est.standard_error + est.bias_bound + 1e-4, (est, exact)
    assert math.isfinite(est.standard_error) and est.standard_error < 2e-3
    assert est.metrics("test")["test/unbiased"] == float(est.unbiased)


def test_an_unknown_evaluation_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown evaluation estimator"):
        EvalProtocol(estimator="exact")


def test_the_chunked_standard_error_matches_the_spread_of_the_estimate_it_describes():
    """Chunks of unequal size and noise, one shared error per chunk and pass (a roulette draw): over many
    simulated evaluations, the mean of SE^2 equals the variance of the weighted mean (brute force)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [25] * 9 + [10, 15]
    noise = torch.linspace(0.1, 2.0, len(sizes), dtype=torch.float64)  # per-chunk error std
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    trials, n_passes = 4000, 2
    draws = torch.randn(trials, n_passes, len(sizes), generator=generator, dtype=torch.float64) * noise
    estimates = (draws.mean(dim=1) * weights).sum(dim=1)  # each trial's bits/dim error
    se2 = torch.tensor([chunked_standard_error(d, sizes) ** 2 for d in draws])
    true_variance = float((weights**2 * noise**2).sum() / n_passes)
    assert float(estimates.var()) == pytest.approx(true_variance, rel=0.07)
    assert float(se2.mean()) == pytest.approx(true_variance, rel=0.07)
    with pytest.raises(ValueError, match="two passes"):
        chunked_standard_error(draws[0, :1], sizes)


def test_each_images_bits_per_dim_is_unbiased_against_the_exact_log_det(trained):
    """The per-image score that a served density model returns: its mean over draws is the exact value."""
    from pipeline.evaluation import bits_per_dim_per_image

    model, data = trained
    images = data.test.images[:6]
    bpd, se = bits_per_dim_per_image(model, images, n_levels=data.n_levels, passes=48)
    torch.manual_seed(1234)  # the function's dequantisation noise
    x = dequantize(images, data.n_levels)
    with torch.no_grad(), model.estimator(ExactLogDet()):
        exact = bits_per_dim(model.log_prob(x), model.dim, data.n_levels).double()
    assert (se > 0).all()
    assert ((bpd - exact).abs() < 4 * se + 1e-6).all(), (bpd - exact) / se
    again, _ = bits_per_dim_per_image(model, images, n_levels=data.n_levels, passes=48)
    assert torch.equal(bpd, again)  # reproducible: a served answer is the library's
