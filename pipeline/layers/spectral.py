"""Spectrally normalised ``Linear`` and ``Conv2d`` with a Lipschitz coefficient ``c < 1``.

The largest singular value is estimated by power iteration on the *operator* the layer applies
(for a convolution, ``conv2d`` and ``conv_transpose2d`` at the layer's real input size, stride and
padding), not on the reshaped kernel, whose norm is a different number. The weight is then only
ever shrunk: ``W * min(1, c / sigma)`` (a soft constraint, as in the paper).

In training mode every forward runs ``n_power_iterations`` steps, warm-started from the previous
step's vectors, and refreshes the stored estimate; with ``power_tol > 0`` it keeps going until the
estimate changes by at most ``power_tol`` (relative) in one step, up to ``max_power_iterations``.
In eval mode the stored estimate is reused, so evaluation is deterministic; so it is inside
:func:`frozen_power_iteration` (the inverse holds the operator fixed while it solves).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_INIT_ITERATIONS = 50  # a good first estimate keeps the first steps from overshooting c


DEFAULT_MAX_POWER_ITERATIONS = 100  # cap of the tolerance-driven power iteration per training step


def _check_spectral_args(coeff: float, n_power_iterations: int, power_tol: float = 0.0) -> None:
    if not (isinstance(coeff, (int, float)) and math.isfinite(coeff) and 0.0 < coeff < 1.0):
        raise ValueError(
            f"Lipschitz coefficient must satisfy 0 < c < 1 for the block to be invertible, got c={coeff!r}"
        )
    if not isinstance(n_power_iterations, int) or n_power_iterations < 0:
        raise ValueError(f"n_power_iterations must be an integer >= 0, got {n_power_iterations!r}")
    if not (math.isfinite(power_tol) and power_tol >= 0):
        raise ValueError(f"power_tol must be >= 0 (0: a fixed number of iterations), got {power_tol!r}")
    if power_tol > 0 and n_power_iterations == 0:
        raise ValueError("power_tol > 0 needs n_power_iterations >= 1 (the minimum per training step)")


def _normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    if x.dim() == 1:
        return F.normalize(x, dim=0, eps=eps)  # one call: this runs inside every training forward
    return x / x.norm().clamp_min(eps)


class _SpectralNorm(nn.Module):
    """Shared power-iteration machinery; subclasses define the operator and its adjoint."""

    weight: Tensor
    u: Tensor
    v: Tensor
    sigma: Tensor
    # class-level defaults, so models pickled (logged to MLflow) before these existed still load and run
    power_tol: float = 0.0
    max_power_iterations: int = DEFAULT_MAX_POWER_ITERATIONS
    power_iteration_frozen: bool = False
    last_power_iterations: int = 0
    _ready: bool = False

    def __init__(
        self, coeff: float, n_power_iterations: int, n_init_iterations: int, power_tol: float, max_power_iterations: int
    ) -> None:
        super().__init__()
        _check_spectral_args(coeff, n_power_iterations, power_tol)
        if max_power_iterations < max(n_power_iterations, 1):
            raise ValueError(f"max_power_iterations must be >= n_power_iterations, got {max_power_iterations}")
        self.coeff = float(coeff)
        self.n_power_iterations = n_power_iterations
        self.n_init_iterations = n_init_iterations
        self.power_tol = float(power_tol)
        self.max_power_iterations = max_power_iterations
        self.power_iteration_frozen = False  # set by frozen_power_iteration()
        self.last_power_iterations = 0  # steps taken by the last training forward (logged per layer)
        self._ready = False  # mirrors the `initialized` buffer once it has been seen True
        self.register_buffer("sigma", torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))

    # -- the operator -----------------------------------------------------------------------
    def _operator(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_vectors(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- power iteration --------------------------------------------------------------------
    @torch.no_grad()
    def power_iteration(self, n: int) -> Tensor | None:
        """Run ``n`` power-iteration steps on the operator, updating ``u`` and ``v`` in place.

        Returns the last step's estimate ``||A v||`` (``None`` for ``n = 0``).
        """
        if n == 0:
            return None
        w = self.weight.detach()
        u = self.u
        for i in range(n):  # on local tensors, the buffers written once at the end (few calls per step)
            v = _normalize(self._adjoint(u, w))
            image = self._operator(v, w)
            if i < n - 1:
                u = _normalize(image)
        sigma = torch.linalg.vector_norm(image)
        self.v.copy_(v)
        self.u.copy_(image / sigma.clamp_min(1e-12))
        return sigma

    @torch.no_grad()
    def _training_power_iteration(self) -> int:
        """The per-step update: ``n_power_iterations`` steps, then (``power_tol > 0``) on to the tolerance."""
        previous = self.sigma.clone() if self.power_tol > 0 else None
        sigma = self.power_iteration(self.n_power_iterations)
        steps = self.n_power_iterations
        if self.power_tol > 0:
            # one host sync per check; warm-started, most steps stop at the first
            while steps < self.max_power_iterations and abs(float(sigma - previous)) > self.power_tol * float(sigma):
                previous = sigma
                sigma = self.power_iteration(1)
                steps += 1
        return steps

    def normalized_weight(self, x: Tensor | None = None) -> Tensor:
        """The weight rescaled to operator norm ``<= c`` (by the current estimate)."""
        if not self._ready:  # a Python flag first: reading the buffer costs a host sync on GPUs
            if not bool(self.initialized):
                if x is None:
                    raise RuntimeError(f"{type(self).__name__} has not seen an input yet; call it on data first")
                self._init_vectors(x)
                self.power_iteration(self.n_init_iterations)
                self.initialized.fill_(True)
                self._refresh_sigma()
            self._ready = True
        if self.training:
            if not self.power_iteration_frozen:
                self.last_power_iterations = self._training_power_iteration()
            # u, v are constants for autograd (cloned: the next step updates them in place)
            u, v = self.u.clone(), self.v.clone()
            sigma = (u * self._operator(v, self.weight)).sum()
            self.sigma.copy_(sigma.detach())
        else:
            sigma = self.sigma
        factor = torch.clamp(self.coeff / sigma, max=1.0)
        return self.weight * factor

    @torch.no_grad()
    def _refresh_sigma(self) -> None:
        self.sigma.copy_((self.u * self._operator(self.v, self.weight)).sum())

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The weight the layer applies in eval mode (for exact norm checks)."""
        if not bool(self.initialized):
            raise RuntimeError(f"{type(self).__name__} has not seen an input yet; call it on data first")
        return self.weight * torch.clamp(self.coeff / self.sigma, max=1.0)

    def estimated_norm(self) -> float:
        """The power-iteration estimate of the effective operator norm, ``min(sigma, c)``."""
        return float(torch.clamp(self.sigma, max=self.coeff))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self._ready = False  # re-read the loaded `initialized` flag on the next forward
        # u and v are sized lazily from the first input; size them from the checkpoint instead
        for name in ("u", "v"):
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SpectralNormLinear(_SpectralNorm):
    """``y = W~ x + b`` with ``||W~||_2 <= c`` (by the power-iteration estimate)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        coeff: float = 0.9,
        n_power_iterations: int = 5,
        n_init_iterations: int = DEFAULT_INIT_ITERATIONS,
        power_tol: float = 0.0,
        max_power_iterations: int = DEFAULT_MAX_POWER_ITERATIONS,
        bias: bool = True,
    ) -> None:
        super().__init__(coeff, n_power_iterations, n_init_iterations, power_tol, max_power_iterations)
        ref = nn.Linear(in_features, out_features, bias=bias)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))

    def _operator(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight @ v

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return u @ weight  # W^T u for a vector u

    def _init_vectors(self, x: Tensor) -> None:
        self.u = self.u.to(dtype=self.weight.dtype, device=self.weight.device)
        self.v = self.v.to(dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(x), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"
        )


class SpectralNormConv2d(_SpectralNorm):
    """``Conv2d`` whose operator norm at its real input size is ``<= c`` (by the estimate).

    The input size is inferred on the first forward; a later input of another size raises,
    because the operator (and so its norm) depends on the size and padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        coeff: float = 0.9,
        n_power_iterations: int = 5,
        n_init_iterations: int = DEFAULT_INIT_ITERATIONS,
        power_tol: float = 0.0,
        max_power_iterations: int = DEFAULT_MAX_POWER_ITERATIONS,
        bias: bool = True,
    ) -> None:
        super().__init__(coeff, n_power_iterations, n_init_iterations, power_tol, max_power_iterations)
        padding = kernel_size // 2 if padding is None else padding
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """The spatial input size the operator norm refers to (``None`` before the first input)."""
        return tuple(self.v.shape[-2:]) if self.v.numel() else None  # type: ignore[return-value]

    def _output_padding(self) -> tuple[int, int]:
        h, w = self.v.shape[-2:]
        ho, wo = self.u.shape[-2:]
        k, s, p = self.kernel_size, self.stride, self.padding
        return h - ((ho - 1) * s - 2 * p + k), w - ((wo - 1) * s - 2 * p + k)

    def _operator(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, stride=self.stride, padding=self.padding)

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(
            u, weight, stride=self.stride, padding=self.padding, output_padding=self._output_padding()
        )

    def _init_vectors(self, x: Tensor) -> None:
        shape = (1, self.in_channels, *x.shape[-2:])
        v = _normalize(torch.randn(shape, dtype=self.weight.dtype, device=self.weight.device))
        self.v = v
        self.u = _normalize(self._operator(v, self.weight.detach()))

    def forward(self, x: Tensor) -> Tensor:
        if self.v.numel() and tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"SpectralNormConv2d was normalised for inputs of size {self.input_hw}, got {tuple(x.shape[-2:])}; "
                "the operator norm depends on the input size"
            )
        return F.conv2d(x, self.normalized_weight(x), self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"
        )


SPECTRAL_LAYERS = (SpectralNormLinear, SpectralNormConv2d)


@contextmanager
def frozen_power_iteration(module: nn.Module) -> Iterator[None]:
    """Hold every spectral normalisation inside ``module`` fixed: no power-iteration update, even in training.

    The normalised weight stays differentiable (through the stored ``u``, ``v``); only the estimate
    stops moving, so an iterative solver sees one and the same operator at every evaluation.
    """
    layers = [m for m in module.modules() if isinstance(m, _SpectralNorm)]
    previous = [layer.power_iteration_frozen for layer in layers]
    for layer in layers:
        layer.power_iteration_frozen = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.power_iteration_frozen = was
