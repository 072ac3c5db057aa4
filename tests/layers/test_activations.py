import pytest
import torch

from pipeline.layers import ACTIVATIONS, make_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_is_1_lipschitz(float64, name):
    act = make_activation(name)
    x = torch.randn(64, 6) * 3
    # the Jacobian of an elementwise map (or a permutation, for sort) has spectral norm max |phi'|
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: act(v.unsqueeze(0)).squeeze(0), xi) for xi in x])
    assert torch.linalg.matrix_norm(jac, ord=2).max() <= 1.0 + 1e-9
    # and on pairs of points, by definition
    y = torch.randn(64, 6) * 3
    ratio = (act(x) - act(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert ratio.max() <= 1.0 + 1e-9


def test_maxmin_sorts_pairs_and_needs_even_channels():
    out = make_activation("sort")(torch.tensor([[3.0, -1.0, 1.0, 2.0]]))
    assert out.tolist() == [[3.0, 2.0, 1.0, -1.0]]
    with pytest.raises(ValueError, match="even"):
        make_activation("sort")(torch.randn(2, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("tanh2")
