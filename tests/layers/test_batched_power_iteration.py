"""The power iteration stacked across layers of one shape takes the same steps as each layer alone."""

import copy

import pytest
import torch

from pipeline.layers import SpectralNormConv2d, SpectralNormLinear
from pipeline.layers.branches import conv_branch, mlp_branch
from pipeline.layers.spectral import SpectralConfig, batched_power_iteration, frozen_power_iteration, spectral_layers
from pipeline.transforms import InvertibleResidualBlock, TransformSequence


def _sequence(kind: str, n_blocks: int = 4, **spectral) -> tuple[TransformSequence, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "mlp":
        blocks = [
            InvertibleResidualBlock(mlp_branch(3, (16, 16), spectral=SpectralConfig(coeff=0.9, **spectral)))
            for _ in range(n_blocks)
        ]
        x = torch.randn(8, 3)
    else:
        blocks = [
            InvertibleResidualBlock(conv_branch(2, 6, spectral=SpectralConfig(coeff=0.9, **spectral)))
            for _ in range(n_blocks)
        ]
        x = torch.randn(2, 2, 5, 5)
    flow = TransformSequence(*blocks)
    flow(x)  # the first forward initialises every layer's vectors
    return flow, x


def _steps_alone(layer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` steps of the layer's own power iteration, from its current vectors, on a copy."""
    alone = copy.deepcopy(layer)
    alone.power_iteration(n)
    return alone.u, alone.v


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_training_forward_takes_each_layers_steps_once_stacked_and_as_each_layer_alone_would(float64, kind):
    flow, x = _sequence(kind, n_power_iterations=3)
    layers = spectral_layers(flow)
    expected = [_steps_alone(layer, 3) for layer in layers]
    flow(x)
    for layer, (u, v) in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.u, u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.v, v, rtol=1e-10, atol=1e-12)
        assert layer.last_power_iterations == 3 and not layer._iterated_ahead


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_stacked_steps_follow_each_layer_for_many_steps(float64, kind):
    """Not only one forward: after ten training forwards the stacked and the per-layer estimates still agree."""
    flow, x = _sequence(kind, n_power_iterations=2)
    alone = copy.deepcopy(flow)
    for _ in range(10):
        flow(x)
        for layer in spectral_layers(alone):
            layer.power_iteration(2)
    for a, b in zip(spectral_layers(flow), spectral_layers(alone), strict=True):
        torch.testing.assert_close(a.sigma, (a.u * a._operator(a.v, a.weight)).sum().detach())
        torch.testing.assert_close(a.u, b.u, rtol=1e-9, atol=1e-11)


def test_layers_it_must_not_touch_iterate_in_their_own_forward():
    flow, x = _sequence("mlp", power_tol=1e-3)  # adaptive: its own loop, with its own stopping rule
    batched_power_iteration(flow)
    assert not any(layer._iterated_ahead for layer in spectral_layers(flow))
    flow, x = _sequence("mlp")
    before = [layer.u.clone() for layer in spectral_layers(flow)]
    with frozen_power_iteration(flow):
        flow(x)
    assert all(torch.equal(layer.u, u) for layer, u in zip(spectral_layers(flow), before, strict=True))
    flow.eval()
    batched_power_iteration(flow)
    assert not any(layer._iterated_ahead for layer in spectral_layers(flow))


def test_layers_group_by_operator_shape():
    torch.manual_seed(0)
    a, b = SpectralNormLinear(4, 4), SpectralNormLinear(4, 4)
    c = SpectralNormLinear(4, 5)
    conv = [SpectralNormConv2d(2, 3, 3), SpectralNormConv2d(2, 3, 3), SpectralNormConv2d(2, 3, 3, stride=2)]
    a(torch.randn(1, 4)), b(torch.randn(1, 4)), c(torch.randn(1, 4))
    for layer in conv:
        layer(torch.randn(1, 2, 6, 6))
    assert a._batch_key() == b._batch_key() != c._batch_key()
    assert conv[0]._batch_key() == conv[1]._batch_key() != conv[2]._batch_key()
    conv[1](torch.randn(1, 2, 6, 6))  # same size: same key; another input size is refused by the layer itself
    assert conv[0]._batch_key() == conv[1]._batch_key()


def test_a_loaded_model_takes_the_stacked_path_on_its_first_step(float64):
    """After a checkpoint load the layers' Python flags are reset; the stacked path must not wait for them,
    or a resumed run would compute its first step differently from an uninterrupted one."""
    flow, x = _sequence("conv")
    reloaded, _ = _sequence("conv")
    reloaded.load_state_dict(flow.state_dict())
    batched_power_iteration(reloaded)
    assert all(layer._iterated_ahead for layer in spectral_layers(reloaded))
