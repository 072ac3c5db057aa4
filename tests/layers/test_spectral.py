import pytest
import torch
import torch.nn.functional as F

from pipeline.layers import SpectralNormConv2d, SpectralNormLinear, dense_operator_norm
from pipeline.layers.spectral import SpectralConfig, frozen_power_iteration


def _dense_conv_norm(layer: SpectralNormConv2d, weight: torch.Tensor) -> float:
    return dense_operator_norm(
        lambda x: F.conv2d(x, weight, stride=layer.stride, padding=layer.padding),
        (layer.in_channels, *layer.input_hw),
        like=weight,
    )


@pytest.mark.parametrize("stride,size", [(1, 6), (2, 6), (2, 7)])
def test_conv_operator_norm_is_at_most_c_after_training_steps(float64, stride, size):
    layer = SpectralNormConv2d(3, 4, 3, spectral=SpectralConfig(coeff=0.7, n_power_iterations=5), stride=stride)
    with torch.no_grad():
        layer.weight.mul_(10.0)  # far above the bound
    x = torch.randn(2, 3, size, size)
    layer.train()
    for _ in range(40):
        layer(x)
    # power iteration approaches sigma from below; with a small spectral gap that takes a while
    assert _dense_conv_norm(layer, layer.effective_weight()) <= 0.7 * (1 + 1e-2)
    layer.power_iteration(3000)
    layer(x)
    true_norm = _dense_conv_norm(layer, layer.effective_weight())
    assert true_norm <= 0.7 * (1 + 1e-8)
    assert true_norm == pytest.approx(0.7, rel=1e-8)  # it was large, so it is rescaled to c exactly
    # the estimate is of the operator at this input size, not of the reshaped kernel
    sigma_dense = _dense_conv_norm(layer, layer.weight.detach())
    assert float(layer.sigma) == pytest.approx(sigma_dense, rel=1e-8)
    assert sigma_dense != pytest.approx(
        float(torch.linalg.matrix_norm(layer.weight.detach().reshape(4, -1), ord=2)), rel=1e-3
    )


def test_linear_operator_norm_is_at_most_c(float64):
    layer = SpectralNormLinear(5, 7, spectral=SpectralConfig(coeff=0.5, n_power_iterations=3))
    with torch.no_grad():
        layer.weight.mul_(5.0)
    for _ in range(30):
        layer(torch.randn(3, 5))
    exact = float(torch.linalg.matrix_norm(layer.effective_weight(), ord=2))
    assert exact == pytest.approx(0.5, rel=1e-8)


def test_small_weights_are_left_untouched(float64):
    layer = SpectralNormConv2d(2, 2, 3, spectral=SpectralConfig(coeff=0.9))
    with torch.no_grad():
        layer.weight.mul_(1e-3)
    x = torch.randn(1, 2, 5, 5)
    layer(x)
    assert torch.equal(layer.normalized_weight(x), layer.weight)
    assert torch.allclose(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1))


def test_eval_mode_reuses_the_stored_estimate(float64):
    layer = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.9, n_power_iterations=2))
    x = torch.randn(2, 2, 5, 5)
    layer(x)
    layer.eval()
    u, v, sigma = layer.u.clone(), layer.v.clone(), layer.sigma.clone()
    out1, out2 = layer(x), layer(x)
    assert torch.equal(out1, out2)
    assert torch.equal(u, layer.u) and torch.equal(v, layer.v) and torch.equal(sigma, layer.sigma)
    layer.train()
    layer(x)
    assert not torch.equal(v, layer.v)  # training steps refine the estimate


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scale", [10.0, 1e-3], ids=["rescaled", "untouched"])
def test_the_training_weight_and_its_gradient_follow_the_formula(float64, kind, scale):
    """Training applies ``W min(1, c / u^T A(W) v)`` with ``u``, ``v`` constants; value and gradient in W and x."""
    if kind == "linear":
        layer, x = SpectralNormLinear(4, 5, spectral=SpectralConfig(coeff=0.5)), torch.randn(3, 4)
    else:
        layer, x = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.5)), torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        layer.weight.mul_(scale)
    layer(x)  # the vectors
    with frozen_power_iteration(layer):
        u, v = layer.u.clone(), layer.v.clone()
        w = layer.weight.detach().clone().requires_grad_(True)
        sigma = (u * layer._operator(v, w)).sum()
        reference_weight = w * torch.clamp(0.5 / sigma, max=1.0)
        xr, xg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        if kind == "linear":
            reference = F.linear(xr, reference_weight, layer.bias)
        else:
            reference = F.conv2d(xr, reference_weight, layer.bias, stride=layer.stride, padding=layer.padding)
        out = layer(xg)
        weights = torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [layer.weight, xg])
        expected = torch.autograd.grad((reference * weights).sum(), [w, xr])
    assert torch.allclose(out, reference, atol=1e-12)
    assert all(torch.allclose(g, e, atol=1e-12) for g, e in zip(grads, expected, strict=True))
    assert (scale > 1) == bool(float(sigma) > 0.5)  # both sides of the clamp are covered


def test_state_dict_round_trip_restores_lazy_vectors(float64):
    layer = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.8))
    x = torch.randn(2, 2, 6, 6)
    layer(x)
    layer.eval()
    clone = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.8))
    clone.load_state_dict(layer.state_dict())
    clone.eval()
    assert clone.input_hw == (6, 6)
    assert torch.equal(clone(x), layer(x))


def test_other_input_size_is_refused():
    layer = SpectralNormConv2d(2, 3, 3)
    layer(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match="normalised for inputs of size"):
        layer(torch.randn(1, 2, 8, 8))


@pytest.mark.parametrize("coeff", [0.0, -0.1, 1.0, 1.5, float("nan")])
def test_bad_coefficient_is_refused(coeff):
    with pytest.raises(ValueError, match="0 < c < 1"):
        SpectralNormLinear(2, 2, spectral=SpectralConfig(coeff=coeff))
    with pytest.raises(ValueError, match="0 < c < 1"):
        SpectralNormConv2d(2, 2, 3, spectral=SpectralConfig(coeff=coeff))


def test_negative_power_iterations_are_refused():
    with pytest.raises(ValueError, match="n_power_iterations"):
        SpectralNormLinear(2, 2, spectral=SpectralConfig(n_power_iterations=-1))


def test_power_iteration_runs_to_its_tolerance_and_is_warm_started(float64):
    layer = SpectralNormConv2d(
        3, 4, 3, spectral=SpectralConfig(coeff=0.7, n_power_iterations=1, power_tol=1e-12, max_power_iterations=5000)
    )
    x = torch.randn(2, 3, 6, 6)
    layer(x)  # first forward: initialisation (50 steps) plus the tolerance-driven update
    first = layer.last_power_iterations
    assert first > 1
    sigma_dense = _dense_conv_norm(layer, layer.weight.detach())
    assert float(layer.sigma) == pytest.approx(sigma_dense, rel=1e-8)
    layer(x)  # the weight did not move: warm-started, one step meets the tolerance
    assert layer.last_power_iterations == 1
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    layer(x)
    assert 1 < layer.last_power_iterations < first + 50
    assert float(layer.sigma) == pytest.approx(_dense_conv_norm(layer, layer.weight.detach()), rel=1e-8)


def test_a_fixed_number_of_iterations_without_tolerance(float64):
    layer = SpectralNormLinear(5, 7, spectral=SpectralConfig(coeff=0.5, n_power_iterations=3))
    layer(torch.randn(2, 5))
    assert layer.last_power_iterations == 3


def test_the_tolerance_loop_is_capped(float64):
    layer = SpectralNormLinear(
        5, 7, spectral=SpectralConfig(coeff=0.5, n_power_iterations=1, power_tol=1e-300, max_power_iterations=7)
    )
    with torch.no_grad():
        layer.weight.copy_(torch.eye(7, 5))  # a repeated top singular value: no gap, never meets 1e-300 exactly
        layer.weight[0, 1] = 1e-3
    layer(torch.randn(2, 5))
    assert layer.last_power_iterations <= 7


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"power_tol": -1e-3}, "power_tol"),
        ({"n_power_iterations": 0}, "n_power_iterations must be an integer >= 1"),
        ({"lipschitz": "hard"}, "unknown lipschitz mode"),
        ({"n_power_iterations": 5, "max_power_iterations": 2}, "max_power_iterations"),
    ],
)
def test_power_iteration_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralConfig(**kwargs)


def test_a_layer_takes_a_spectral_config_only():
    with pytest.raises(TypeError, match="SpectralConfig"):
        SpectralNormLinear(2, 2, {"coeff": 0.5})
    layer = SpectralNormConv2d(2, 3, 3, SpectralConfig(coeff=0.5, lipschitz="strict"))
    assert (layer.coeff, layer.lipschitz, layer.n_power_iterations) == (0.5, "strict", 5)


def test_an_initialised_layer_does_not_copy_its_bf16_input_to_float32():
    """Under --amp a layer's input is bf16; only the first forward (which sizes the vectors) needs it in float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    layer = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.5))
    x = torch.randn(4, 2, 5, 5, dtype=torch.bfloat16)
    layer.normalized_weight(x)  # the first call sizes u and v from x
    with Copies() as copies:
        layer.normalized_weight(x)
    assert tuple(x.shape) not in copies.shapes
