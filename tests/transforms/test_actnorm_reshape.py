import pytest
import torch

from pipeline.transforms import ActNorm, InjectivePad, LogitTransform, SplitPriorCoupling, Squeeze
from pipeline.transforms.reshape import Flatten, Unflatten
from tests.transforms.helpers import dense_jacobians


def test_actnorm_initialises_to_zero_mean_unit_variance(float64):
    x = torch.randn(64, 3, 4, 4) * 5 + 2
    layer = ActNorm(3)
    y, _ = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_actnorm_leaves_constant_channels_unscaled(float64):
    x = torch.randn(32, 3, 4, 4)
    x[:, 2] = 0.0  # an injective-padding channel
    layer = ActNorm(3)
    layer(x)
    assert layer.log_scale[2] == 0 and layer.log_scale[:2].abs().max() > 0


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 3, 3)])
def test_actnorm_logdet_and_inverse_are_exact(float64, shape):
    x = torch.randn(*shape)
    layer = ActNorm(shape[1])
    layer(torch.randn(*shape) * 3)  # initialise on other data
    y, logdet = layer(x)
    jac = dense_jacobians(lambda v: layer(v)[0], x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet)
    assert torch.allclose(layer.inverse(y), x)


def test_actnorm_inverse_before_init_is_refused():
    with pytest.raises(RuntimeError, match="not initialised"):
        ActNorm(2).inverse(torch.randn(1, 2))


def test_squeeze_is_a_volume_preserving_permutation(float64):
    x = torch.randn(2, 3, 4, 6)
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(logdet, torch.zeros(2))
    assert torch.equal(Squeeze().inverse(y), x)
    assert torch.equal(y.flatten(1).sort().values, x.flatten(1).sort().values)
    with pytest.raises(ValueError, match="even H and W"):
        Squeeze()(torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize(
    "order, channels",
    [
        # channel c's pixel at patch position p = 2 dh + dw holds 10 c + p: where each lands, written out by hand
        ("channel_major", [0, 1, 2, 3, 10, 11, 12, 13]),
        ("position_major", [0, 10, 1, 11, 2, 12, 3, 13]),  # the paper's code: the positions' channels together
    ],
)
def test_the_squeezes_channel_order_on_a_2x2_example(order, channels):
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[10.0, 11.0], [12.0, 13.0]]]])  # (1, 2, 2, 2)
    y, _ = Squeeze(order)(x)
    assert y.shape == (1, 8, 1, 1) and y.flatten().tolist() == channels
    assert torch.equal(Squeeze(order).inverse(y), x)
    big = torch.randn(3, 4, 6, 8)
    assert torch.equal(Squeeze(order).inverse(Squeeze(order)(big)[0]), big)
    assert Squeeze(order)(torch.zeros(0, 2, 4, 4))[0].shape == (0, 8, 2, 2)
    with pytest.raises(ValueError, match="unknown squeeze order"):
        Squeeze("row_major")


def test_injective_padding_round_trip():
    x = torch.randn(2, 3, 4, 4)
    pad = InjectivePad(13)
    y = pad(x)
    assert y.shape == (2, 16, 4, 4) and torch.equal(y[:, 3:], torch.zeros(2, 13, 4, 4))
    assert torch.equal(pad.inverse(y), x)


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_transform_logdet_and_inverse_are_exact(float64, alpha):
    x = torch.rand(3, 2, 3, 3) - 0.5
    x[0, 0, 0, 0] = -0.5  # the ends of the dequantised range stay finite
    x[0, 0, 0, 1] = 0.5
    layer = LogitTransform(alpha)
    y, logdet = layer(x)
    jac = dense_jacobians(lambda v: layer(v)[0], x)
    assert torch.isfinite(y).all()
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet)
    assert torch.allclose(layer.inverse(y), x)
    x_rec, inverse_logdet = layer.inverse_and_logdet(y)
    assert torch.allclose(inverse_logdet, -logdet)


def test_logit_transform_gives_nan_outside_its_range_and_refuses_a_bad_alpha():
    # no device-side assert: data outside the box makes a NaN, which the training loop's non-finite check stops
    # (the data itself is checked where it is loaded, pipeline.data.ImageDataset)
    for bad in (0.7, -0.6, float("nan")):
        y, logdet = LogitTransform()(torch.full((1, 1, 2, 2), bad))
        assert torch.isnan(y).all() and torch.isnan(logdet).all()
    for alpha in (0.0, 0.5):
        with pytest.raises(ValueError, match="alpha must be in"):
            LogitTransform(alpha)


def test_split_prior_coupling_starts_at_identity_and_is_exact(float64):
    layer = SplitPriorCoupling(4)
    x = torch.randn(3, 4, 3, 3)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(3))  # zero-initialised: the identity
    with torch.no_grad():
        layer.net.weight.normal_(0, 0.5)
        layer.net.bias.normal_(0, 0.5)
    y, logdet = layer(x)
    jac = dense_jacobians(lambda v: layer(v)[0], x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet)
    assert torch.equal(y[:, 2:], x[:, 2:])  # the half that goes on is untouched
    assert torch.allclose(layer.inverse(y), x)
    with pytest.raises(ValueError, match="even number of channels"):
        SplitPriorCoupling(3)


def test_flatten_and_unflatten_are_inverse_reshapes():
    x = torch.randn(2, 3, 4, 5)
    y, logdet = Flatten((3, 4, 5))(x)
    assert y.shape == (2, 60) and torch.equal(logdet, torch.zeros(2))
    assert torch.equal(Flatten((3, 4, 5)).inverse(y), x)
    assert torch.equal(Unflatten((3, 4, 5))(y)[0], x) and torch.equal(Unflatten((3, 4, 5)).inverse(x), y)
    with pytest.raises(ValueError, match="Flatten expects"):
        Flatten((3, 4, 5))(torch.randn(2, 3, 4, 4))
