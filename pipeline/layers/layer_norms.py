"""The operator norm of any linear layer: plain ``nn.Linear`` / ``nn.Conv2d`` or a spectrally normalised one.

A module of its own because it needs both :mod:`pipeline.layers.operator_norm` (the exact norms, which the
spectral layers use) and :mod:`pipeline.layers.spectral` (the layers): neither imports the other's users.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.layers.operator_norm import conv_operator_norm, dense_operator_norm
from pipeline.layers.spectral import SpectralNormConv2d, SpectralNormLinear


def layer_operator_norm(
    layer: nn.Module, *, method: str = "certified", input_hw: tuple[int, int] | None = None
) -> float:
    """Operator norm of the linear map a layer applies (bias excluded), as used in eval mode.

    ``method``: ``"certified"`` (exact for linear layers and small or 1x1 convolutions, the FFT
    bound for larger ones),
    ``"dense"`` (exact, builds the full matrix: small layers only) or ``"estimate"`` (the stored
    power-iteration estimate, spectrally normalised layers only). ``input_hw`` is needed for plain
    ``nn.Conv2d``; spectrally normalised convolutions know their input size.
    """
    if method == "estimate":
        if not isinstance(layer, (SpectralNormLinear, SpectralNormConv2d)):
            raise TypeError(f"'estimate' needs a spectrally normalised layer, got {type(layer).__name__}")
        return layer.estimated_norm()
    if method not in ("certified", "dense"):
        raise ValueError(f"unknown method {method!r}; choose 'certified', 'dense' or 'estimate'")
    if method == "certified" and isinstance(layer, (SpectralNormLinear, SpectralNormConv2d)):
        return layer.certified_norm()  # of exactly the weight the layer applies in eval mode

    if isinstance(layer, SpectralNormLinear):
        weight = layer.effective_weight()
        return float(torch.linalg.matrix_norm(weight.double(), ord=2))
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))

    if isinstance(layer, SpectralNormConv2d):
        weight, stride, padding = layer.effective_weight(), layer.stride, layer.padding
        input_hw = layer.input_hw
    elif isinstance(layer, nn.Conv2d):
        plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
        if isinstance(layer.padding, str) or not plain:
            raise NotImplementedError(
                "only plain zero-padded convolutions (groups=1, dilation=1, numeric padding) are supported"
            )
        weight, stride, padding = layer.weight.detach(), layer.stride[0], layer.padding[0]
    else:
        raise TypeError(f"no operator norm for {type(layer).__name__}")
    if input_hw is None:
        raise ValueError("the input size of the convolution is unknown; pass input_hw or run the layer once")

    if method == "dense":
        c_in = weight.shape[1]
        return dense_operator_norm(
            lambda x: F.conv2d(x, weight, stride=stride, padding=padding), (c_in, *input_hw), like=weight
        )
    # a plain convolution: exact where the Gram matrix is small, else the FFT bound (no per-layer proof: a
    # vanilla network's norms are reported, not relied on)
    return conv_operator_norm(weight, input_hw, stride, padding, max_banded_flops=0).bound
