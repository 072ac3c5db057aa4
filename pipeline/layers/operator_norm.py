"""Exact operator norms, for checking what power iteration only estimates.

* :func:`dense_operator_norm` builds the full matrix of any linear map and takes its largest
  singular value: exact, for small layers only.
* :func:`conv_singular_values_fft` gives every singular value of a *circular* 2-D convolution on
  an ``n x n`` grid as the singular values of the Fourier-transformed kernel (Sedghi et al. 2019).
* :func:`conv_operator_norm_bound` is a certified upper bound for a zero-padded convolution: it
  is a restriction of a circular one on the padded grid, ``A = P C E`` with ``||P||, ||E|| <= 1``.

* :func:`conv_operator_norm` gives the tightest affordable certified bound of a zero-padded
  convolution: exact from the Gram matrix of its smaller side where that is small, a banded
  Cholesky proof within a slack of a Lanczos estimate where it is larger, else the FFT bound.

The FFT bound is a few per cent loose on small grids (2.5-3% for a 3x3 kernel on 14x14, up to 7% on
7x7), so the ``"certified"`` method of :func:`layer_operator_norm` takes the exact norm where affordable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

# exact conv norms from the Gram matrix of the smaller side, d x d: its eigendecomposition costs O(d^3)
# (d = 784: ~0.05 s on one CPU core)
GRAM_MAX_DIM = 1024
BANDED_MAX_FLOPS = 2e10  # larger Gram matrices: a banded Cholesky proof costs ~ d * bandwidth^2


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


def conv_operator_norm_bound_tensor(weight: Tensor, input_hw: tuple[int, int], padding: int) -> Tensor:
    """:func:`conv_operator_norm_bound` as a float64 tensor on the weight's device (no host sync)."""
    k_h, k_w = weight.shape[-2:]
    if k_h == k_w == 1 and padding == 0:  # the same matrix at every pixel: its norm, exactly (stride 1)
        return torch.linalg.matrix_norm(weight.detach().double().flatten(1), ord=2)
    h, w = input_hw
    grid = (max(h + 2 * padding, k_h), max(w + 2 * padding, k_w))
    return conv_singular_values_fft(weight, grid).max()


def conv_operator_norm_bound(weight: Tensor, input_hw: tuple[int, int], padding: int) -> float:
    """Certified upper bound on the operator norm of a zero-padded convolution (any stride).

    Exact for circular padding and for 1x1 kernels; for zero padding the circular convolution on
    the grid padded by ``padding`` on each side contains the layer as a restriction, so its norm
    bounds the layer's (a few per cent above it for 3x3 kernels on 7x7 to 14x14 grids). Striding
    only drops outputs, which cannot increase the norm.
    """
    return float(conv_operator_norm_bound_tensor(weight, input_hw, padding))


@dataclass(frozen=True)
class CertifiedNorm:
    """A certified upper ``bound`` of an operator norm, the best ``estimate`` of the norm, and how."""

    bound: float
    estimate: float | None  # None: only the bound is known
    method: str  # "exact", "gram-cholesky" or "fft"

    @property
    def exact(self) -> bool:
        return self.method == "exact"


def _conv_output_hw(input_hw: tuple[int, int], k: int, stride: int, padding: int) -> tuple[int, int]:
    return tuple((n + 2 * padding - k) // stride + 1 for n in input_hw)  # type: ignore[return-value]


def conv_output_padding(
    input_hw: Sequence[int],
    output_hw: Sequence[int],
    kernel: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[int, int]:
    """The ``output_padding`` that makes ``conv_transpose2d`` (the adjoint of a convolution) return ``input_hw``, the
    rows and columns a stride rounded away; each size an int or one per axis."""
    return tuple(
        n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1)
        for n_in, n_out, k, s, p, d in zip(
            input_hw, output_hw, _pair(kernel), _pair(stride), _pair(padding), _pair(dilation), strict=True
        )
    )


def conv_gram_dim(weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int) -> int:
    """Rows of the Gram matrix of a convolution's smaller side (0 for a 1x1 kernel: exact from the kernel)."""
    if _is_pointwise(weight, stride, padding):
        return 0
    c_out, c_in, k, _ = weight.shape
    h_out, w_out = _conv_output_hw(input_hw, k, stride, padding)
    return min(c_in * input_hw[0] * input_hw[1], c_out * h_out * w_out)


def conv_gram_bandwidth(weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int) -> int:
    """The bandwidth of :func:`conv_gram_matrix` (pixel-major), from the kernel's shape alone.

    Two pixels of the smaller side are coupled when one output reads both (input side) or both outputs read one input
    (output side); the largest index distance of a coupled pair, in channels, is the band. Equal to the built matrix's
    bandwidth when no kernel tap is exactly zero (an upper bound otherwise), at the cost of an index computation: the
    Gram matrix of a paper classifier's 3x3 layer takes ~40 CPU-s to build, too long to build just to learn that the
    banded proof would be too expensive.
    """
    c_out, c_in, k_h, k_w = weight.shape
    h, wd = input_hw
    h_out, w_out = _conv_output_hw(input_hw, k_h, stride, padding)
    oi, oj, di, dj = np.meshgrid(*(np.arange(n) for n in (h_out, w_out, k_h, k_w)), indexing="ij")
    i, j = stride * oi + di - padding, stride * oj + dj - padding
    valid = (i >= 0) & (i < h) & (j >= 0) & (j < wd)
    pixel_in, pixel_out = (i * wd + j)[valid], (oi * w_out + oj)[valid]
    input_side = c_in * h * wd <= c_out * h_out * w_out  # the side conv_gram_matrix takes
    group, member, channels = (pixel_out, pixel_in, c_in) if input_side else (pixel_in, pixel_out, c_out)
    if member.size == 0:
        return 0
    highest, lowest = np.full(group.max() + 1, -1), np.full(group.max() + 1, np.iinfo(np.int64).max)
    np.maximum.at(highest, group, member)
    np.minimum.at(lowest, group, member)
    seen = highest >= 0
    return int((highest[seen] - lowest[seen]).max()) * channels + channels - 1


def _is_pointwise(weight: Tensor, stride: int, padding: int) -> bool:
    return weight.shape[-2:] == (1, 1) and padding == 0 and stride == 1


def conv_operator_matrix_sparse(
    weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int
) -> scipy.sparse.csr_matrix:
    """The matrix of a zero-padded convolution as a ``scipy.sparse`` CSR matrix (float64), pixel-major.

    Row ``(i_out * w_out + j_out) * c_out + c``, column ``(i * w + j) * c_in + c'``: a permutation of
    ``conv2d(x).flatten() == M @ x.flatten()``, so the same singular values, and a banded Gram matrix
    (a 3x3 kernel couples pixels at most two rows apart). Built from the kernel by index arithmetic.
    """
    w = weight.detach().double().cpu().numpy()
    c_out, c_in, k_h, k_w = w.shape
    h, wd = input_hw
    h_out, w_out = _conv_output_hw(input_hw, k_h, stride, padding)
    oc, oi, oj, ic, di, dj = np.meshgrid(*(np.arange(n) for n in (c_out, h_out, w_out, c_in, k_h, k_w)), indexing="ij")
    i, j = stride * oi + di - padding, stride * oj + dj - padding  # the input pixel each tap reads
    valid = (i >= 0) & (i < h) & (j >= 0) & (j < wd)
    rows = ((oi * w_out + oj) * c_out + oc)[valid]
    cols = ((i * wd + j) * c_in + ic)[valid]
    shape = (c_out * h_out * w_out, c_in * h * wd)
    return scipy.sparse.csr_matrix((w[oc, ic, di, dj][valid], (rows, cols)), shape=shape)


def conv_gram_matrix(weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int) -> scipy.sparse.csr_matrix:
    """The Gram matrix of a convolution's smaller side (``A^T A`` or ``A A^T``), ``scipy.sparse``, float64."""
    a = conv_operator_matrix_sparse(weight, input_hw, stride, padding)
    gram = (a.T @ a) if a.shape[1] <= a.shape[0] else (a @ a.T)
    return (0.5 * (gram + gram.T)).tocsr()  # symmetric up to rounding


@torch.no_grad()
def conv_operator_norm_estimate(
    weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int, *, tol: float = 1e-10
) -> tuple[float, bool]:
    """Lanczos (ARPACK) estimate of a convolution's norm from products with ``A^T A``, and whether it converged.

    Far faster than the power iteration when the top singular values are close (as they are for
    convolutions): a few dozen products instead of thousands. An estimate, not a bound. The products run in float64
    where the weight lives (on a GPU, not the host's cores: a paper classifier's evaluation spent most of its time
    in these products on the CPU); ARPACK's vectors cross to the device and back once per product.
    """
    w = weight.detach().double()
    c_in = w.shape[1]
    out_hw = _conv_output_hw(input_hw, w.shape[-1], stride, padding)
    output_padding = conv_output_padding(input_hw, out_hw, w.shape[-1], stride, padding)
    d = c_in * input_hw[0] * input_hw[1]

    def gram_times(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(w.device).reshape(1, c_in, *input_hw)
        image = F.conv2d(v, w, stride=stride, padding=padding)
        back = F.conv_transpose2d(image, w, stride=stride, padding=padding, output_padding=output_padding)
        return back.reshape(-1).cpu().numpy()

    operator = scipy.sparse.linalg.LinearOperator((d, d), matvec=gram_times, dtype=np.float64)
    try:
        value = scipy.sparse.linalg.eigsh(operator, k=1, which="LA", tol=tol, return_eigenvectors=False)[0]
        return float(np.sqrt(max(value, 0.0))), True
    except scipy.sparse.linalg.ArpackNoConvergence as stalled:
        values = stalled.eigenvalues
        return (float(np.sqrt(max(values.max(), 0.0))) if len(values) else 0.0), False


def conv_operator_norm(
    weight: Tensor,
    input_hw: tuple[int, int],
    stride: int,
    padding: int,
    *,
    slack: float = 1e-3,
    estimate: float | None = None,
    max_dense_dim: int = GRAM_MAX_DIM,
    max_banded_flops: float = BANDED_MAX_FLOPS,
) -> CertifiedNorm:
    """The tightest affordable certified bound on a zero-padded convolution's norm.

    * ``"exact"``: 1x1 kernels (stride 1), and wherever the Gram matrix ``G`` of the smaller side
      has at most ``max_dense_dim`` rows (its largest eigenvalue, in float64).
    * ``"gram-cholesky"``: larger ``G``: from an ``estimate`` of the norm (Lanczos if not given), a
      banded Cholesky factorisation of ``mu I - G`` with ``mu = (estimate (1 + slack))^2`` proves
      ``lambda_max(G) < mu``, so ``||A|| <= estimate (1 + slack)`` (the factorisation exists only for
      a positive definite matrix; its rounding error is far below the margin).
    * ``"fft"``: else (or if the proof fails), the FFT bound, a few per cent loose on small grids.
    """
    if _is_pointwise(weight, stride, padding):
        norm = conv_operator_norm_bound(weight, input_hw, padding)
        return CertifiedNorm(norm, norm, "exact")
    d = conv_gram_dim(weight, input_hw, stride, padding)
    if d > max_dense_dim and d * (conv_gram_bandwidth(weight, input_hw, stride, padding) + 1) ** 2 > max_banded_flops:
        return CertifiedNorm(conv_operator_norm_bound(weight, input_hw, padding), estimate, "fft")  # no Gram needed
    gram = conv_gram_matrix(weight, input_hw, stride, padding)
    d = gram.shape[0]
    if d <= max_dense_dim:
        norm = float(np.sqrt(max(np.linalg.eigvalsh(gram.toarray())[-1], 0.0)))
        return CertifiedNorm(norm, norm, "exact")
    coo = gram.tocoo()
    bandwidth = int(np.abs(coo.row - coo.col).max())
    if d * (bandwidth + 1) ** 2 <= max_banded_flops:
        for guess in ([estimate] if estimate else []) + [None]:
            if guess is None:
                guess, _ = conv_operator_norm_estimate(weight, input_hw, stride, padding)
            if guess > 0 and _banded_cholesky_succeeds(gram, bandwidth, (guess * (1 + slack)) ** 2):
                return CertifiedNorm(guess * (1 + slack), guess, "gram-cholesky")
    return CertifiedNorm(conv_operator_norm_bound(weight, input_hw, padding), estimate, "fft")


def _banded_cholesky_succeeds(gram: scipy.sparse.csr_matrix, bandwidth: int, mu: float) -> bool:
    """Whether ``mu I - gram`` is positive definite, i.e. ``lambda_max(gram) < mu``."""
    upper = (mu * scipy.sparse.identity(gram.shape[0]) - gram).tocoo()
    keep = upper.col >= upper.row
    band = np.zeros((bandwidth + 1, gram.shape[0]))
    band[bandwidth + upper.row[keep] - upper.col[keep], upper.col[keep]] = upper.data[keep]
    try:
        scipy.linalg.cholesky_banded(band, lower=False)
    except np.linalg.LinAlgError:
        return False
    return True
