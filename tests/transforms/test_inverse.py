import logging

import pytest
import torch

from pipeline.layers.branches import branch_lipschitz_bound, conv_branch, mlp_branch
from pipeline.transforms import (
    ExactLogDet,
    FixedPointConfig,
    InverseDidNotConverge,
    InverseReport,
    InvertibleResidualBlock,
    fixed_point_inverse,
)


def _saturated_block(branch, x, estimator=None):
    with torch.no_grad():
        for p in branch.parameters():
            p.mul_(3.0)
    block = InvertibleResidualBlock(branch, estimator=estimator)
    for _ in range(30):
        block(x)
    return block.eval()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_inverse_of_forward_is_identity_at_c_09(float64, kind):
    if kind == "mlp":
        x = torch.randn(16, 3)
        block = _saturated_block(mlp_branch(3, (32, 32), coeff=0.9), x)
    else:
        x = torch.randn(4, 2, 5, 5)
        block = _saturated_block(conv_branch(2, 8, coeff=0.9), x)
    y = block.map(x)
    result = fixed_point_inverse(block.branch, y, FixedPointConfig(atol=0, rtol=1e-10, max_iterations=500))
    assert result.converged.all()
    rel = (result.x - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert rel.max() < 1e-5
    # the residual is measured at the returned point
    measured = (result.x + block.branch(result.x) - y).flatten(1).norm(dim=1)
    assert torch.allclose(measured, result.residual)


def test_error_follows_the_banach_bound(float64):
    x = torch.randn(8, 3)
    block = _saturated_block(mlp_branch(3, (32, 32), coeff=0.9), x)
    lip = branch_lipschitz_bound(block.branch)
    y = block.map(x)
    first_step = (block.branch(y)).flatten(1).norm(dim=1)  # ||x^1 - x^0|| = ||g(y)||
    for k in (2, 5, 10):
        res = fixed_point_inverse(block.branch, y, FixedPointConfig(atol=1e-300, rtol=0, max_iterations=k))
        err = (res.x - x).norm(dim=1)
        assert (err <= lip**k / (1 - lip) * first_step * (1 + 1e-9)).all()


def test_samples_stop_on_their_own_residual(float64):
    x = torch.randn(6, 3)
    block = _saturated_block(mlp_branch(3, (16,), coeff=0.9), x)
    y = block.map(x)
    y[0] = y[0] * 1e-3  # a far easier sample
    cfg = FixedPointConfig(atol=1e-8, rtol=0)
    res = fixed_point_inverse(block.branch, y, cfg)
    assert res.converged.all()
    assert (res.residual <= 1e-8).all()
    assert res.iterations.min() < res.iterations.max()


def test_non_convergence_is_reported_not_silent(float64, caplog):
    x = torch.randn(4, 3)
    block = _saturated_block(mlp_branch(3, (16,), coeff=0.9), x)
    y = block.map(x)
    with caplog.at_level(logging.WARNING):
        res = fixed_point_inverse(block.branch, y, FixedPointConfig(atol=1e-12, rtol=0, max_iterations=2))
    assert not res.converged.any()
    assert "did not reach" in caplog.text
    with pytest.raises(InverseDidNotConverge):
        fixed_point_inverse(block.branch, y, FixedPointConfig(atol=1e-12, rtol=0, max_iterations=2, strict=True))
    report = InverseReport()
    block.inverse_config = FixedPointConfig(atol=1e-12, rtol=0, max_iterations=2)
    block.inverse(y, report=report)
    assert report.n_not_converged == [4] and not report.converged


def test_inverse_logdet_is_evaluated_at_the_reconstruction(float64):
    x = torch.randn(5, 3)
    block = _saturated_block(mlp_branch(3, (16,), coeff=0.9), x, estimator=ExactLogDet())
    y, logdet = block(x)
    x_rec, inv_logdet = block.inverse_and_logdet(y)
    assert torch.allclose(x_rec, x, atol=1e-5)
    assert torch.allclose(inv_logdet, -logdet, atol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError):
        FixedPointConfig(atol=0, rtol=0)
    with pytest.raises(ValueError):
        FixedPointConfig(max_iterations=0)
