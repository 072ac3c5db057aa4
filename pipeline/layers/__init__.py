"""Lipschitz-constrained layers and exact operator norms."""

from pipeline.layers.activations import ACTIVATIONS, LipSwish, MaxMin, make_activation
from pipeline.layers.layer_norms import layer_operator_norm
from pipeline.layers.operator_norm import (
    conv_operator_norm_bound,
    conv_singular_values_fft,
    dense_operator_matrix,
    dense_operator_norm,
)
from pipeline.layers.spectral import (
    SPECTRAL_LAYERS,
    LipschitzOptions,
    SpectralConfig,
    SpectralNormConv2d,
    SpectralNormLinear,
)

__all__ = [
    "ACTIVATIONS",
    "SPECTRAL_LAYERS",
    "LipSwish",
    "MaxMin",
    "LipschitzOptions",
    "SpectralConfig",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "conv_operator_norm_bound",
    "conv_singular_values_fft",
    "dense_operator_matrix",
    "dense_operator_norm",
    "layer_operator_norm",
    "make_activation",
]
