import copy

import pytest
import torch
from torch import nn

from pipeline.layers import LipSwish
from pipeline.layers.branches import (
    conv_branch,
    forward_with_jacobian,
    has_structured_jacobian,
    mlp_branch,
)
from pipeline.layers.spectral import SpectralConfig
from tests.transforms.helpers import dense_jacobians


def _input(name: str) -> torch.Tensor:
    if name == "mlp":
        return torch.randn(3, 5)
    # the strided branch on an even height: its adjoint must restore the row the stride rounded away
    return torch.randn(3, 2, 6, 5) if name == "conv-strided" else torch.randn(3, 2, 5, 5)


def _branches() -> dict[str, nn.Sequential]:
    spectral = SpectralConfig(coeff=0.9, n_power_iterations=3)
    return {
        **{f"conv-{a}": conv_branch(2, 6, activation=a, spectral=spectral) for a in ("lipswish", "elu", "softplus")},
        "conv-unconstrained": conv_branch(2, 6, activation="lipswish", spectral=None, preactivation=True),
        "conv-strided": nn.Sequential(  # stride, dilation, groups and an asymmetric size: the adjoint's shape
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ELU(),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
            LipSwish(),
            nn.Conv2d(4, 2, 1),
        ),
        "mlp": mlp_branch(5, (7, 7), activation="lipswish", spectral=spectral, preactivation=True),
    }


@pytest.mark.parametrize("name", list(_branches()))
def test_forward_with_jacobian_is_the_branch_and_its_exact_jacobian_products(float64, name):
    """Against the branch's own forward and the dense Jacobian (brute force, one sample at a time)."""
    torch.manual_seed(0)
    branch = _branches()[name]
    x = _input(name)
    branch(x)  # the spectral vectors
    branch.eval()  # the applied weights are fixed: the brute force sees the same map
    assert has_structured_jacobian(branch)
    gx, jacobian = forward_with_jacobian(branch, x)
    assert torch.allclose(gx, branch(x), atol=1e-12)
    dense = dense_jacobians(branch, x)  # (B, d_out, d_in)
    u, t = torch.randn_like(gx), torch.randn_like(x)
    assert torch.allclose(jacobian.vjp(u), torch.einsum("bo,boi->bi", u.flatten(1), dense).reshape(x.shape), atol=1e-10)
    assert torch.allclose(
        jacobian.jvp(t), torch.einsum("boi,bi->bo", dense, t.flatten(1)).reshape(gx.shape), atol=1e-10
    )


@pytest.mark.parametrize("name", list(_branches()))
def test_the_tangent_products_gradient_is_autograds_double_backward(float64, name):
    """``d/d(x, θ) <w, J v>`` through :meth:`BranchJacobian.jvp` (first order) against the same derivative of
    ``<w^T J, v>`` by autograd's double backward: the Neumann gradient both ways."""
    torch.manual_seed(2)
    branch = _branches()[name]
    x = _input(name)
    branch(x)
    branch.eval()
    x = x.requires_grad_(True)
    params = list(branch.parameters())
    gx, jacobian = forward_with_jacobian(branch, x)
    w, v = torch.randn_like(gx), torch.randn_like(x)
    tangent = torch.autograd.grad((w * jacobian.jvp(v)).sum(), [x, *params], allow_unused=True)
    (wj,) = torch.autograd.grad(branch(x), x, w, create_graph=True)
    double = torch.autograd.grad((wj * v).sum(), [x, *params], allow_unused=True)
    for a, b in zip(tangent, double, strict=True):
        if b is None:  # a bias: no part in J
            assert a is None or torch.count_nonzero(a) == 0
        else:
            assert torch.allclose(a, b, atol=1e-10)


def test_forward_with_jacobian_trains_as_the_branch_does(float64):
    """In training mode: one power iteration per layer as in the module's forward, and the same graph to the
    parameters (the loss on g(x) backpropagates identically)."""
    torch.manual_seed(1)
    branch = conv_branch(2, 6, activation="lipswish", spectral=SpectralConfig(coeff=0.9, n_power_iterations=2))
    x = torch.randn(4, 2, 5, 5)
    branch(x)
    twin = copy.deepcopy(branch)
    gx, _ = forward_with_jacobian(branch, x)
    reference = twin(x)
    assert torch.equal(gx, reference)
    for a, b in zip(branch.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)
    grads = torch.autograd.grad((gx**2).sum(), list(branch.parameters()))
    expected = torch.autograd.grad((reference**2).sum(), list(twin.parameters()))
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-12)


def test_branches_without_a_closed_form_product_are_refused():
    assert not has_structured_jacobian(mlp_branch(4, (6,), activation="sort"))  # not elementwise
    assert not has_structured_jacobian(conv_branch(2, 4, spectral=None, batchnorm=True))
    assert not has_structured_jacobian(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")))
    assert not has_structured_jacobian(nn.Sequential(nn.Conv2d(2, 2, 3, padding="same")))  # a string padding
    assert not has_structured_jacobian(nn.Sequential(conv_branch(2, 4)))  # a layer that is not a map or activation
    assert not has_structured_jacobian(lambda x: x)
