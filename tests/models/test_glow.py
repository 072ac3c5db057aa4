import pytest
import torch

from pipeline.models import vector_flow
from pipeline.models.base import n_parameters
from pipeline.models.glow import GlowArchitecture, GlowFlow, matched_glow
from pipeline.transforms.coupling import AffineCoupling, InvertibleLinear
from tests.transforms.helpers import dense_jacobians


def _perturb(module):
    with torch.no_grad():  # leave the zero-initialised identity so the test is not trivial
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def test_glow_logdet_equals_brute_force_and_inverse_round_trips(float64):
    flow = GlowFlow(GlowArchitecture(dim=3, n_steps=3, hidden=(8,)))
    x = torch.randn(5, 3)
    flow(x)  # ActNorm init
    _perturb(flow)
    (z,), logdet = flow(x)
    jac = dense_jacobians(lambda v: flow(v)[0][0], x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
    assert torch.allclose(flow.inverse([z]), x, atol=1e-10)


def test_coupling_and_linear_pieces(float64):
    for layer in (InvertibleLinear(4), AffineCoupling(4, (8,), swap=True)):
        _perturb(layer)
        x = torch.randn(6, 4)
        y, logdet = layer(x)
        jac = dense_jacobians(lambda v, layer=layer: layer(v)[0], x)
        assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
        assert torch.allclose(layer.inverse(y), x, atol=1e-10)


def test_invertible_linear_on_feature_maps_is_a_1x1_convolution(float64):
    layer = InvertibleLinear(3)
    _perturb(layer)
    x = torch.randn(4, 3, 2, 5)
    y, logdet = layer(x)
    jac = dense_jacobians(lambda v: layer(v)[0].flatten(1), x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-10)  # H * W * log|det W|
    assert torch.allclose(layer.inverse(y), x, atol=1e-10)
    # each pixel's channel vector is mapped by the same matrix as the vector form
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(y.permute(0, 2, 3, 1).reshape(-1, 3), layer(pixels)[0], atol=1e-12)
    with pytest.raises(ValueError, match=r"expects \(B, 3\) or \(B, 3, H, W\)"):
        layer(torch.randn(2, 4, 2, 2))


def test_matched_glow_has_the_same_depth_and_about_the_same_parameters():
    reference = vector_flow("quick")
    glow = matched_glow(reference)
    assert len(glow.flow) == 3 * len(reference.residual_blocks())
    assert abs(n_parameters(glow) - n_parameters(reference)) / n_parameters(reference) < 0.05
