import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layers import (
    SpectralNormConv2d,
    conv_operator_norm_bound,
    conv_singular_values_fft,
    dense_operator_matrix,
    dense_operator_norm,
    layer_operator_norm,
)
from pipeline.layers.spectral import SpectralConfig


@pytest.mark.parametrize("c_in,c_out,k,n", [(2, 3, 3, 5), (3, 3, 1, 4), (1, 2, 3, 3)])
def test_fft_singular_values_equal_dense_svd_of_circular_convolution(float64, c_in, c_out, k, n):
    weight = torch.randn(c_out, c_in, k, k)
    p = k // 2

    def circular(x):
        return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), weight)

    dense = torch.linalg.svdvals(dense_operator_matrix(circular, (c_in, n, n), like=weight))
    fft = conv_singular_values_fft(weight, (n, n)).flatten().sort(descending=True).values
    assert torch.allclose(fft, dense[: fft.numel()], atol=1e-10)


@pytest.mark.parametrize("size,stride,padding", [(5, 1, 1), (6, 2, 1), (4, 1, 0), (7, 1, 1)])
def test_certified_bound_is_at_least_the_dense_norm_of_zero_padded_conv(float64, size, stride, padding):
    weight = torch.randn(4, 3, 3, 3)
    dense = dense_operator_norm(
        lambda x: F.conv2d(x, weight, stride=stride, padding=padding), (3, size, size), like=weight
    )
    bound = conv_operator_norm_bound(weight, (size, size), padding)
    assert bound >= dense * (1 - 1e-12)
    assert bound <= 1.5 * dense  # a useful bound, not a trivial one


def test_layer_operator_norm_methods_agree_on_spectral_conv(float64):
    layer = SpectralNormConv2d(2, 3, 3, spectral=SpectralConfig(coeff=0.9))
    with torch.no_grad():
        layer.weight.mul_(4)
    x = torch.randn(1, 2, 6, 6)
    layer(x)
    layer.power_iteration(3000)  # converge the estimate (small spectral gaps converge slowly)
    layer(x)
    dense = layer_operator_norm(layer, method="dense")
    assert layer_operator_norm(layer, method="certified") >= dense
    assert layer_operator_norm(layer, method="estimate") == pytest.approx(dense, rel=1e-4)


def test_plain_conv_needs_its_input_size():
    with pytest.raises(ValueError, match="input_hw"):
        layer_operator_norm(nn.Conv2d(2, 2, 3, padding=1))
    assert layer_operator_norm(nn.Conv2d(2, 2, 3, padding=1), input_hw=(5, 5)) > 0


@pytest.mark.parametrize(
    "c_in, c_out, k, size, stride, padding",
    [(3, 5, 3, 7, 1, 1), (5, 3, 3, 7, 1, 1), (2, 4, 3, 8, 2, 1), (4, 2, 3, 9, 2, 0), (3, 3, 5, 6, 1, 2),
     (2, 6, 3, 3, 1, 1), (4, 4, 1, 5, 2, 0), (6, 2, 3, 2, 1, 1)],
)  # fmt: skip
def test_gram_bandwidth_from_the_shape_equals_the_built_matrix(c_in, c_out, k, size, stride, padding):
    """The bandwidth that decides, before building it, whether the Gram matrix is worth building, against the one
    measured on the built matrix (no kernel tap is zero), on both sides, strided and padded."""
    from pipeline.layers.operator_norm import conv_gram_bandwidth, conv_gram_matrix

    weight = torch.randn(c_out, c_in, k, k, generator=torch.Generator().manual_seed(0))
    gram = conv_gram_matrix(weight, (size, size), stride, padding).tocoo()
    measured = int(abs(gram.row - gram.col).max())
    assert conv_gram_bandwidth(weight, (size, size), stride, padding) == measured
