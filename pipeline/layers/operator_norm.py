"""Exact operator norms, for checking what power iteration only estimates.

* :func:`dense_operator_norm` builds the full matrix of any linear map and takes its largest
  singular value: exact, for small layers only.
* :func:`conv_singular_values_fft` gives every singular value of a *circular* 2-D convolution on
  an ``n x n`` grid as the singular values of the Fourier-transformed kernel (Sedghi et al. 2019).
* :func:`conv_operator_norm_bound` is a certified upper bound for a zero-padded convolution: it
  is a restriction of a circular one on the padded grid, ``A = P C E`` with ``||P||, ||E|| <= 1``.

The bound is loose on tiny grids (a 3x3 kernel on a 2x2 image), so :func:`layer_operator_norm`'s
``"certified"`` method takes the exact dense norm whenever the operator is small enough.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.spectral import SpectralNormConv2d, SpectralNormLinear

DENSE_MAX_ENTRIES = 2**22  # operators up to this many matrix entries get an exact dense SVD


def dense_operator_matrix(op: Callable[[Tensor], Tensor], input_shape: tuple[int, ...], *, like: Tensor) -> Tensor:
    """The matrix ``M`` with ``op(x).flatten() == M @ x.flatten()`` for a linear ``op``."""
    d = 1
    for s in input_shape:
        d *= s
    basis = torch.eye(d, dtype=like.dtype, device=like.device).reshape(d, *input_shape)
    with torch.no_grad():
        columns = op(basis).reshape(d, -1)
    return columns.t()


def dense_operator_norm(op: Callable[[Tensor], Tensor], input_shape: tuple[int, ...], *, like: Tensor) -> float:
    """Largest singular value of a linear ``op`` on inputs of ``input_shape`` (no batch dim)."""
    matrix = dense_operator_matrix(op, input_shape, like=like)
    return float(torch.linalg.svdvals(matrix.double())[0])


def conv_singular_values_fft(weight: Tensor, grid: tuple[int, int]) -> Tensor:
    """All singular values of the circular convolution with ``weight`` on a ``grid`` (Sedghi et al.).

    ``weight`` has shape ``(c_out, c_in, k_h, k_w)``; ``grid`` must be at least the kernel size.
    Returns a tensor of shape ``(grid_h * grid_w, min(c_out, c_in))``.
    """
    n_h, n_w = grid
    k_h, k_w = weight.shape[-2:]
    if n_h < k_h or n_w < k_w:
        raise ValueError(f"grid {grid} is smaller than the kernel {(k_h, k_w)}")
    transformed = torch.fft.fft2(weight.detach().double(), s=(n_h, n_w))  # (c_out, c_in, n_h, n_w)
    per_frequency = transformed.permute(2, 3, 0, 1).reshape(n_h * n_w, *weight.shape[:2])
    return torch.linalg.svdvals(per_frequency)


def conv_operator_norm_bound(weight: Tensor, input_hw: tuple[int, int], padding: int) -> float:
    """Certified upper bound on the operator norm of a zero-padded convolution (any stride).

    Exact for circular padding; for zero padding the circular convolution on the grid padded by
    ``padding`` on each side contains the layer as a restriction, so its norm bounds the layer's.
    Striding only drops outputs, which cannot increase the norm.
    """
    h, w = input_hw
    k_h, k_w = weight.shape[-2:]
    grid = (max(h + 2 * padding, k_h), max(w + 2 * padding, k_w))
    return float(conv_singular_values_fft(weight, grid).max())


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

    if isinstance(layer, SpectralNormLinear):
        weight = layer.effective_weight()
        return float(torch.linalg.matrix_norm(weight.double(), ord=2))
    if isinstance(layer, nn.Linear):
        return float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))

    if isinstance(layer, SpectralNormConv2d):
        weight, stride, padding = layer.effective_weight(), layer.stride, layer.padding
        input_hw = layer.input_hw
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise NotImplementedError("only plain zero-padded convolutions (groups=1, dilation=1) are supported")
        weight, stride, padding = layer.weight.detach(), layer.stride[0], layer.padding[0]
    else:
        raise TypeError(f"no operator norm for {type(layer).__name__}")
    if input_hw is None:
        raise ValueError("the input size of the convolution is unknown; pass input_hw or run the layer once")

    c_out, c_in, k_h, k_w = weight.shape
    h, w = input_hw
    exact_by_fft = k_h == k_w == 1 and padding == 0 and stride == 1  # circular == zero-padded
    small = c_in * h * w * c_out * h * w <= DENSE_MAX_ENTRIES
    if method == "dense" or (small and not exact_by_fft):
        return dense_operator_norm(
            lambda x: F.conv2d(x, weight, stride=stride, padding=padding), (c_in, *input_hw), like=weight
        )
    return conv_operator_norm_bound(weight, input_hw, padding)
