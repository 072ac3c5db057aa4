import math

import pytest
import torch

from pipeline.bounds import logdet_bounds, power_series_truncation_bound
from pipeline.layers.branches import branch_lipschitz_bound, conv_branch, mlp_branch
from pipeline.transforms import ExactLogDet, PowerSeriesLogDet, make_estimator, sample_probe
from tests.transforms.helpers import dense_jacobians, power_series_from_dense


def _trained_like(branch, x, steps=30):
    """Converge the spectral estimates (a few training-mode forwards), then freeze them."""
    for _ in range(steps):
        branch(x)
    return branch.eval()


@pytest.fixture
def mlp(float64):
    branch = mlp_branch(4, (16, 16), coeff=0.9, n_power_iterations=5)
    with torch.no_grad():
        for p in branch.parameters():
            p.mul_(3.0)  # saturate the constraint so Lip(g) is near its bound
    x = torch.randn(3, 4)
    return _trained_like(branch, x), x


@pytest.fixture
def conv(float64):
    branch = conv_branch(2, 6, coeff=0.9, n_power_iterations=5)
    x = torch.randn(2, 2, 3, 3)
    return _trained_like(branch, x), x


def _exact(branch, x):
    jac = dense_jacobians(branch, x)
    eye = torch.eye(jac.shape[-1])
    return torch.linalg.slogdet(eye + jac).logabsdet, jac


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_exact_estimator_equals_brute_force_jacobian(name, request):
    branch, x = request.getfixturevalue(name)
    gx, logdet = ExactLogDet()(branch, x)
    reference, _ = _exact(branch, x)
    assert torch.allclose(gx, branch(x))
    assert torch.allclose(logdet, reference, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_truncation_bias_falls_with_terms_and_respects_theorem_3(name, request):
    branch, x = request.getfixturevalue(name)
    exact, jac = _exact(branch, x)
    lip = branch_lipschitz_bound(branch, input_hw=tuple(x.shape[-2:]) if x.dim() == 4 else None)
    assert lip < 1
    d = x[0].numel()
    errors = []
    for n in (1, 2, 4, 8, 16):
        err = (power_series_from_dense(jac, n) - exact).abs().max().item()
        assert err <= power_series_truncation_bound(lip, d, n) + 1e-12
        errors.append(err)
    assert errors[-1] < errors[0] / 10
    assert errors[-1] < 0.05


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_estimate_is_unbiased_for_the_truncated_series(mlp, probe):
    branch, x = mlp
    x0 = x[:1].expand(4000, -1)  # one sample, 4000 independent probes in one batch
    n_terms = 6
    _, estimates = PowerSeriesLogDet(n_terms=n_terms, probe=probe)(branch, x0)
    target = power_series_from_dense(dense_jacobians(branch, x[:1]), n_terms)
    stderr = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - target) < 4 * stderr


def test_many_probes_reach_the_exact_logdet_within_standard_errors(conv):
    branch, x = conv
    exact, _ = _exact(branch, x[:1])
    x0 = x[:1].expand(2000, -1, -1, -1)
    _, estimates = PowerSeriesLogDet(n_terms=30)(branch, x0)
    stderr = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - exact) < 4 * stderr + 1e-4


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_lemma_7_bounds_hold(name, request):
    branch, x = request.getfixturevalue(name)
    exact, _ = _exact(branch, x)
    lip = branch_lipschitz_bound(branch, input_hw=tuple(x.shape[-2:]) if x.dim() == 4 else None)
    low, high = logdet_bounds(lip, x[0].numel())
    assert ((exact >= low) & (exact <= high)).all()


def test_power_series_gradient_matches_exact_gradient_in_expectation(mlp):
    branch, x = mlp
    branch.train()  # gradients w.r.t. parameters, through the normalisation
    params = [p for p in branch.parameters() if p.requires_grad]
    x0 = x[:1]
    _, exact = ExactLogDet()(branch, x0)
    _, est = PowerSeriesLogDet(n_terms=20)(branch, x0.expand(3000, -1))

    def flat_grad(value):  # the last bias does not enter the Jacobian: its gradient is zero
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)]
        )

    flat_exact, flat_est = flat_grad(exact.sum()), flat_grad(est.mean())
    assert flat_exact.norm() > 0
    assert (flat_est - flat_exact).norm() / flat_exact.norm() < 0.1


def test_estimators_under_no_grad_return_detached_values(mlp):
    branch, x = mlp
    with torch.no_grad():
        for est in (ExactLogDet(), PowerSeriesLogDet()):
            gx, logdet = est(branch, x)
            assert not gx.requires_grad and not logdet.requires_grad


def test_exact_estimator_refuses_large_dimensions():
    branch = mlp_branch(8, (4,))
    with pytest.raises(ValueError, match="max_dim=4"):
        ExactLogDet(max_dim=4)(branch, torch.randn(2, 8))


def test_estimator_arguments_are_validated():
    with pytest.raises(ValueError, match="n_terms"):
        PowerSeriesLogDet(n_terms=0)
    with pytest.raises(ValueError, match="n_terms"):
        make_estimator("power_series", n_terms=-3)
    with pytest.raises(ValueError, match="probe"):
        PowerSeriesLogDet(probe="uniform")
    with pytest.raises(ValueError, match="unknown log-det estimator"):
        make_estimator("russian")


def test_rademacher_probe_is_plus_minus_one():
    v = sample_probe(torch.empty(1000), "rademacher")
    assert set(v.unique().tolist()) == {-1.0, 1.0}
