import logging

import pytest
import torch

from pipeline.layers import SpectralNormConv2d, SpectralNormLinear
from pipeline.layers.branches import branch_lipschitz_bound, conv_branch, mlp_branch
from pipeline.layers.spectral import SpectralConfig
from pipeline.transforms import (
    ExactLogDet,
    FixedPointConfig,
    InverseDidNotConverge,
    InverseReport,
    InvertibleResidualBlock,
    fixed_point_inverse,
)
from tests.transforms.helpers import dense_jacobians


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
        block = _saturated_block(mlp_branch(3, (32, 32), spectral=SpectralConfig(coeff=0.9)), x)
    else:
        x = torch.randn(4, 2, 5, 5)
        block = _saturated_block(conv_branch(2, 8, spectral=SpectralConfig(coeff=0.9)), x)
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
    block = _saturated_block(mlp_branch(3, (32, 32), spectral=SpectralConfig(coeff=0.9)), x)
    lip = branch_lipschitz_bound(block.branch)
    y = block.map(x)
    first_step = (block.branch(y)).flatten(1).norm(dim=1)  # ||x^1 - x^0|| = ||g(y)||
    for k in (2, 5, 10):
        res = fixed_point_inverse(block.branch, y, FixedPointConfig(atol=1e-300, rtol=0, max_iterations=k))
        err = (res.x - x).norm(dim=1)
        assert (err <= lip**k / (1 - lip) * first_step * (1 + 1e-9)).all()


def test_samples_stop_on_their_own_residual(float64):
    x = torch.randn(6, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x)
    y = block.map(x)
    y[0] = y[0] * 1e-3  # a far easier sample
    cfg = FixedPointConfig(atol=1e-8, rtol=0)
    res = fixed_point_inverse(block.branch, y, cfg)
    assert res.converged.all()
    assert (res.residual <= 1e-8).all()
    assert res.iterations.min() < res.iterations.max()


def test_non_convergence_is_reported_not_silent(float64, caplog):
    x = torch.randn(4, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x)
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
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x, estimator=ExactLogDet())
    y, logdet = block(x)
    x_rec, inv_logdet = block.inverse_and_logdet(y)
    assert torch.allclose(x_rec, x, atol=1e-5)
    assert torch.allclose(inv_logdet, -logdet, atol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError):
        FixedPointConfig(atol=0, rtol=0)
    with pytest.raises(ValueError):
        FixedPointConfig(max_iterations=0)


# --- Anderson acceleration, fallback, implicit gradients ------------------------------------------------------
def _contractive_block(kind: str, coeff: float = 0.97):
    """``g = tanh(W x + b)`` with ``||W|| = coeff`` reached: Lip(g) near ``coeff``, so plain iteration is slow."""
    if kind == "mlp":
        layer, x = (
            SpectralNormLinear(6, 6, spectral=SpectralConfig(coeff=coeff, n_power_iterations=20)),
            torch.randn(8, 6),
        )
    else:
        layer, x = (
            SpectralNormConv2d(2, 2, 3, spectral=SpectralConfig(coeff=coeff, n_power_iterations=20)),
            torch.randn(4, 2, 5, 5),
        )
    with torch.no_grad():
        layer.weight.mul_(10.0)
    block = InvertibleResidualBlock(torch.nn.Sequential(layer, torch.nn.Tanh()))
    for _ in range(20):
        block(x)
    return block.eval(), x


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_anderson_meets_the_same_tolerance_in_fewer_evaluations(float64, kind):
    block, x = _contractive_block(kind)
    y = block.map(x)
    plain = fixed_point_inverse(block.branch, y, FixedPointConfig(atol=0, rtol=1e-10, max_iterations=3000))
    fast = fixed_point_inverse(
        block.branch, y, FixedPointConfig(atol=0, rtol=1e-10, max_iterations=3000, method="anderson")
    )
    for result in (plain, fast):
        assert result.converged.all()
        measured = (result.x + block.branch(result.x) - y).flatten(1).norm(dim=1)
        assert torch.allclose(measured, result.residual)  # the residual is that of the returned point
        assert (result.residual <= 1e-10 * y.flatten(1).norm(dim=1)).all()
        assert ((result.x - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max() < 1e-8
    assert not fast.fell_back.any()
    # the gain grows with the contraction of J: large for the 6-d map (eigenvalues near 0.97), modest for the
    # 50-d convolution, whose spectral radius is far below its norm
    speedup = 3 if kind == "mlp" else 1.2
    assert fast.iterations.max() * speedup < plain.iterations.max()


def test_a_stalled_anderson_falls_back_to_the_plain_iteration(float64, monkeypatch):
    import pipeline.transforms.inverse as inverse

    x = torch.randn(6, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x)
    y = block.map(x)
    # a mixing step that makes no progress (proposes the newest stored iterate again), then one that breaks
    monkeypatch.setattr(inverse, "_anderson_mix", lambda xs, fs, cfg: xs[:, -1].clone())
    cfg = FixedPointConfig(atol=0, rtol=1e-10, max_iterations=500, method="anderson", stall_iterations=4)
    result = fixed_point_inverse(block.branch, y, cfg)
    assert result.converged.all() and result.fell_back.all()
    assert (result.iterations > 4).all()
    assert torch.allclose(result.x, x, atol=1e-8)
    monkeypatch.setattr(inverse, "_anderson_mix", lambda xs, fs, cfg: torch.full_like(xs[:, -1], float("nan")))
    report = InverseReport()
    block.inverse_config = cfg
    x_rec = block.inverse(y, report=report)
    assert torch.allclose(x_rec, x, atol=1e-8) and report.n_fallback == [6] and report.converged


def test_anderson_reports_non_convergence_like_the_plain_iteration(float64, caplog):
    x = torch.randn(4, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x)
    y = block.map(x)
    cfg = FixedPointConfig(atol=1e-14, rtol=0, max_iterations=2, method="anderson")
    with caplog.at_level(logging.WARNING):
        result = fixed_point_inverse(block.branch, y, cfg)
    assert not result.converged.any() and "did not reach" in caplog.text and "anderson" in caplog.text
    measured = (result.x + block.branch(result.x) - y).flatten(1).norm(dim=1)
    assert torch.allclose(measured, result.residual)


@pytest.mark.parametrize("method", ["plain", "anderson"])
def test_implicit_gradient_equals_the_inverse_jacobian(float64, method):
    """d x / d y = (I + J_g(x))^{-1}, from the dense Jacobian at the solution."""
    x = torch.randn(3, 4)
    block = _saturated_block(mlp_branch(4, (16, 16), spectral=SpectralConfig(coeff=0.9)), x)
    block.inverse_config = FixedPointConfig(atol=0, rtol=1e-12, max_iterations=1000, method=method, backward_rtol=1e-12)
    y = block.map(x).detach().requires_grad_(True)
    x_rec = block.inverse(y)
    probe = torch.randn_like(x_rec)
    (grad_y,) = torch.autograd.grad((x_rec * probe).sum(), y)
    jac = dense_jacobians(block.branch, x_rec.detach())
    eye = torch.eye(4).expand_as(jac)
    # v^T (I + J)^{-1} per sample
    expected = torch.linalg.solve((eye + jac).transpose(1, 2), probe[..., None])[..., 0]
    assert torch.allclose(grad_y, expected, atol=1e-9)


@pytest.mark.parametrize("method", ["plain", "anderson"])
def test_implicit_parameter_gradient_equals_backprop_through_an_unrolled_solve(float64, method):
    x = torch.randn(5, 3)
    block = _saturated_block(mlp_branch(3, (16, 16), spectral=SpectralConfig(coeff=0.9)), x)
    params = [p for p in block.branch.parameters() if p.requires_grad]
    y = block.map(x).detach()
    block.inverse_config = FixedPointConfig(atol=0, rtol=1e-12, max_iterations=1000, method=method, backward_rtol=1e-12)
    loss = (block.inverse(y) ** 3).sum()
    implicit = torch.autograd.grad(loss, params)
    # brute force: 300 plain iterations with the whole graph kept (what the implicit gradient avoids)
    x_unrolled = y.clone()
    for _ in range(300):
        x_unrolled = y - block.branch(x_unrolled)
    unrolled = torch.autograd.grad((x_unrolled**3).sum(), params)
    for a, b in zip(implicit, unrolled, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_no_graph_is_kept_through_the_iterations(float64):
    x = torch.randn(4, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x)
    y = block.map(x).detach().requires_grad_(True)
    calls = {"with_grad": 0, "without": 0}

    def counted(t):
        calls["with_grad" if torch.is_grad_enabled() else "without"] += 1
        return block.branch(t)

    result = fixed_point_inverse(counted, y, FixedPointConfig(atol=0, rtol=1e-10, max_iterations=500))
    assert calls["with_grad"] == 1 and calls["without"] == int(result.iterations.max())
    result.x.sum().backward()
    assert y.grad is not None and calls["with_grad"] == 1  # backward re-uses that one graph
    with torch.no_grad():
        assert not fixed_point_inverse(block.branch, y).x.requires_grad


def test_sampling_loss_gradient_through_a_whole_flow_matches_finite_differences(float64):
    from pipeline.models import iresnet_flow

    flow = iresnet_flow("quick", input_shape=(1, 4, 4), n_blocks=(2, 1), hidden_channels=4, n_power_iterations=5)
    flow(torch.rand(16, 1, 4, 4) - 0.5)  # ActNorm init and spectral estimates
    flow.eval()
    for block in flow.residual_blocks():
        block.inverse_config = FixedPointConfig(atol=0, rtol=1e-13, max_iterations=2000, method="anderson")
    zs = flow.sample_latents(3)
    weight = flow.residual_blocks()[1].branch[0].weight

    def loss() -> torch.Tensor:
        return (flow.inverse(zs) ** 2).sum()

    (grad,) = torch.autograd.grad(loss(), weight)
    eps, index = 1e-6, (1, 0, 1, 1)
    with torch.no_grad():
        weight[index] += eps
        up = loss()
        weight[index] -= 2 * eps
        down = loss()
        weight[index] += eps
    assert float(grad[index]) == pytest.approx(float(up - down) / (2 * eps), rel=1e-5)


def test_the_inverse_holds_the_spectral_normalisation_fixed_in_training_mode(float64):
    x = torch.randn(4, 3)
    block = _saturated_block(mlp_branch(3, (16,), spectral=SpectralConfig(coeff=0.9)), x).train()
    y = block.map(x).detach()
    layer = block.branch[0]
    with torch.no_grad():  # a training step moved the weight: an unfrozen power iteration would move too
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    u, v = layer.u.clone(), layer.v.clone()
    outputs = []
    original = block.branch.forward
    block.branch.forward = lambda t: outputs.append(original(x)) or original(t)  # g on a fixed input, per call
    try:
        block.inverse(y)
    finally:
        del block.branch.forward
    assert torch.equal(u, layer.u) and torch.equal(v, layer.v)
    assert len(outputs) > 3 and all(torch.equal(o, outputs[0]) for o in outputs)  # one operator throughout
    block.map(x)  # a training forward outside the inverse updates the estimate again
    assert not torch.equal(v, layer.v)


def test_inverse_config_is_validated():
    for kwargs, message in [
        ({"method": "newton"}, "unknown inverse method"),
        ({"anderson_memory": 0}, "anderson_memory"),
        ({"anderson_damping": 0.0}, "anderson_damping"),
        ({"stall_iterations": 0}, "stall_iterations"),
    ]:
        with pytest.raises(ValueError, match=message):
            FixedPointConfig(**kwargs)
