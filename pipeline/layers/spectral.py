"""Spectrally normalised ``Linear`` and ``Conv2d`` with a Lipschitz coefficient ``c < 1``.

The largest singular value is estimated by power iteration on the *operator* the layer applies
(for a convolution, ``conv2d`` and ``conv_transpose2d`` at the layer's real input size, stride and
padding), not on the reshaped kernel, whose norm is a different number. The weight is then only
ever shrunk: ``W * min(1, c / sigma)``.

Training forwards run ``n_power_iterations`` steps (at least one), warm-started from the previous
step's vectors; with ``power_tol > 0`` they go on until the estimate changes by at most ``power_tol``
(relative) in one step, up to ``max_power_iterations``. The estimate approaches ``||W||`` from below
and lags a weight that moves fast, so with ``lipschitz="soft"`` (the paper's constraint) a training
forward can apply a norm somewhat above ``c``. ``lipschitz="strict"`` divides by at least a certified
upper bound of ``||W||`` (exact for linear layers, the FFT bound for convolutions), so every training
forward applies a norm ``<= c``, at the price of the bound's looseness (2-7% for 3x3 kernels on 7x7 to
28x28 grids, about 2x for stride 2) and an FFT of each kernel per step.

In eval mode (evaluation, inversion, sampling, certification, a reloaded model) both modes apply
the weight of :meth:`eval_normalization`, recomputed from the current weight whenever it has changed
(an optimiser step, a load: ``weight._version``) and cached until it changes again, whatever the
optimiser did since the last training forward. Soft mode divides by ``||W||`` itself: exact (dense
Gram matrix, linear layers, 1x1 kernels) where affordable, else a converged Lanczos estimate, and
where that does not converge, by a certified bound. :meth:`certificate` proves the applied norm
``<= c (1 + CERTIFIED_SLACK)`` (for large convolutions by a banded Cholesky factorisation, see
:func:`pipeline.layers.operator_norm.conv_operator_norm`) and, should an estimate ever fall short of
the proof, divides by the bound instead; :meth:`certified_norm` is the certified norm of exactly
the applied weight. Inside :func:`frozen_power_iteration` (an inverse during training) the training
estimate does not move.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from pipeline.attributes import temporarily_set
from pipeline.fields import documented
from pipeline.layers.operator_norm import (
    GRAM_MAX_DIM,
    CertifiedNorm,
    conv_gram_dim,
    conv_operator_norm,
    conv_operator_norm_bound_tensor,
    conv_operator_norm_estimate,
    conv_output_padding,
)
from pipeline.precision import full_precision

log = logging.getLogger(__name__)

DEFAULT_INIT_ITERATIONS = 50  # a good first estimate keeps the first steps from overshooting c
DEFAULT_MAX_POWER_ITERATIONS = 100  # cap of the tolerance-driven power iteration per training step
LIPSCHITZ_MODES = ("soft", "strict")
CERTIFIED_SLACK = 1e-3  # the applied norm is <= c (1 + slack): an estimate may fall that far short of a proof
CERTIFY_POWER_TOL = 1e-7  # relative change of sigma at which the eval-time power iteration stops
CERTIFY_MAX_POWER_ITERATIONS = 500  # only for layers too large for a tight bound


@dataclass(frozen=True)
class LipschitzOptions:
    """The spectral-normalisation fields every architecture has (flow, classifier, vector flow), declared once here.

    ``coeff=None`` means unconstrained ("vanilla") branches, where an architecture allows them (the classifier);
    :meth:`spectral_config` turns the fields into the :class:`SpectralConfig` of every branch layer.
    """

    coeff: float | None = documented(0.9, "Lipschitz coefficient c of every residual branch, in (0, 1)")
    n_power_iterations: int = documented(5, "power-iteration steps per training forward (>= 1, warm-started)")
    power_tol: float = documented(
        0.0, "> 0: power iteration runs until sigma changes by at most this (relative) in a step; 0: fixed count"
    )
    lipschitz: str = documented(
        "soft", "soft (the paper: estimated sigma) or strict (a certified bound: Lip(g) <= c at every forward)"
    )

    def spectral_config(self) -> SpectralConfig | None:
        """The branch layers' normalisation (validated), or ``None`` for unconstrained branches."""
        if self.coeff is None:
            return None
        return SpectralConfig(self.coeff, self.n_power_iterations, self.power_tol, self.lipschitz)

    def constrained_spectral_config(self) -> SpectralConfig:
        """:meth:`spectral_config` for an architecture whose branches are always constrained (a flow)."""
        spectral = self.spectral_config()
        if spectral is None:
            raise ValueError(
                f"{type(self).__name__} needs a Lipschitz coefficient 0 < c < 1 to be invertible, got coeff=None"
            )
        return spectral


@dataclass(frozen=True)
class SpectralConfig:
    """How a spectrally normalised layer keeps its operator norm ``<= coeff`` (validated on construction).

    One object from the configuration to the layer, as :class:`~pipeline.transforms.inverse.FixedPointConfig`
    is for the inverse. Where a branch takes ``spectral``, ``None`` means an unconstrained ("vanilla") layer.

    ``coeff``: the Lipschitz coefficient c, ``0 < c < 1``. ``n_power_iterations``: power-iteration steps per
    training forward (at least one, warm-started); with ``power_tol > 0`` they go on until sigma changes by at
    most ``power_tol`` (relative) in one step, up to ``max_power_iterations``. ``lipschitz``: ``"soft"`` (the
    paper) or ``"strict"`` (every training forward applies a norm ``<= c``, by a certified bound per step).
    ``n_init_iterations``: steps of the first estimate, on the first input.
    """

    coeff: float = 0.9
    n_power_iterations: int = 5
    power_tol: float = 0.0
    lipschitz: str = "soft"
    max_power_iterations: int = DEFAULT_MAX_POWER_ITERATIONS
    n_init_iterations: int = DEFAULT_INIT_ITERATIONS

    def __post_init__(self) -> None:
        coeff = self.coeff
        if isinstance(coeff, bool) or not (isinstance(coeff, (int, float)) and math.isfinite(coeff) and 0 < coeff < 1):
            raise ValueError(
                f"Lipschitz coefficient must satisfy 0 < c < 1 for the block to be invertible, got c={coeff!r}"
            )
        object.__setattr__(self, "coeff", float(coeff))
        if not isinstance(self.n_power_iterations, int) or self.n_power_iterations < 1:
            raise ValueError(
                f"n_power_iterations must be an integer >= 1 (power-iteration steps per training forward; with 0 "
                f"the estimate would never follow the weight), got {self.n_power_iterations!r}"
            )
        if not (math.isfinite(self.power_tol) and self.power_tol >= 0):
            raise ValueError(f"power_tol must be >= 0 (0: a fixed number of iterations), got {self.power_tol!r}")
        object.__setattr__(self, "power_tol", float(self.power_tol))
        if self.lipschitz not in LIPSCHITZ_MODES:
            raise ValueError(f"unknown lipschitz mode {self.lipschitz!r}; choose one of {LIPSCHITZ_MODES}")
        if self.max_power_iterations < self.n_power_iterations:
            raise ValueError(
                f"max_power_iterations must be >= n_power_iterations ({self.n_power_iterations}), "
                f"got {self.max_power_iterations}"
            )
        if self.n_init_iterations < 0:
            raise ValueError(f"n_init_iterations must be >= 0, got {self.n_init_iterations}")


def _normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    # two kernels (F.normalize takes five): this runs in every power-iteration step
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def _normalize_each(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Each ``x[i]`` divided by its own norm (the stacked vectors of a batched power iteration)."""
    norms = torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(eps)
    return x / norms.reshape(-1, *[1] * (x.dim() - 1))


@dataclass
class EvalNormalization:
    """What a layer applies in eval mode for one version of its weight: ``W * min(1, c / sigma)``.

    ``reference`` is the best estimate of ``||W||`` (``reference_method``: ``"exact"``, ``"lanczos"``,
    ``"power"`` or, for strict-mode convolutions, the ``"training"`` estimate). ``proof`` is a
    certified upper bound of ``||W||`` (``None`` until :meth:`_SpectralNorm.certificate` asks for it,
    where the estimate came without one); once it is there, ``sigma >= proof.bound / (1 + slack)``,
    so the applied norm is at most ``c (1 + slack)``.
    """

    key: tuple
    sigma: Tensor  # 0-dim, weight dtype and device
    reference: float
    reference_method: str
    reference_converged: bool
    proof: CertifiedNorm | None = None


class _SpectralNorm(nn.Module):
    """Shared power-iteration and certification machinery; subclasses define the operator and its adjoint."""

    weight: Tensor
    u: Tensor
    v: Tensor
    initialized: Tensor
    sigma: Tensor
    _step_bound_is_exact: bool = False  # whether _step_bound is the norm itself (linear layers); per class

    def __init__(self, spectral: SpectralConfig) -> None:
        super().__init__()
        if not isinstance(spectral, SpectralConfig):
            raise TypeError(f"spectral must be a SpectralConfig, got {type(spectral).__name__}")
        self.spectral = spectral
        self.power_iteration_frozen = False  # set by frozen_power_iteration()
        self.last_power_iterations = 0  # steps taken by the last training forward (logged per layer)
        self._ready = False  # mirrors the `initialized` buffer once it has been seen True
        self._iterated_ahead = False  # set by batched_power_iteration, consumed by the next training forward
        self._eval: EvalNormalization | None = None  # eval-time normalisation, per weight version
        self.register_buffer("sigma", torch.ones(()))  # the training estimate (power iteration)
        self.register_buffer("initialized", torch.tensor(False))

    # the settings, read where they are used (one source: self.spectral)
    coeff = property(lambda self: self.spectral.coeff)
    n_power_iterations = property(lambda self: self.spectral.n_power_iterations)
    n_init_iterations = property(lambda self: self.spectral.n_init_iterations)
    power_tol = property(lambda self: self.spectral.power_tol)
    max_power_iterations = property(lambda self: self.spectral.max_power_iterations)
    lipschitz = property(lambda self: self.spectral.lipschitz)

    # -- the operator -----------------------------------------------------------------------
    def _operator(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_vectors(self, x: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch_key(self) -> tuple:  # pragma: no cover - abstract
        """Layers with equal keys can run their power iterations as one stacked operation."""
        raise NotImplementedError

    def _stacked_operator(self, v: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        """:meth:`_operator` of ``G`` layers of this layer's kind at once: ``v[i]`` by ``weight[i]``."""
        raise NotImplementedError

    def _stacked_adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step_bound(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        """A certified upper bound of the operator norm, cheap enough for every training step (no host sync)."""
        raise NotImplementedError

    def _estimate_norm(self, weight: Tensor) -> tuple[float, str, bool, CertifiedNorm | None]:  # pragma: no cover
        """The best affordable estimate of the norm: (value, method, converged, proof where it comes free)."""
        raise NotImplementedError

    def _prove_norm(self, weight: Tensor, estimate: float | None) -> CertifiedNorm:  # pragma: no cover - abstract
        """The tightest affordable certified upper bound of the norm (``estimate`` helps a proof along)."""
        raise NotImplementedError

    # -- power iteration --------------------------------------------------------------------
    @torch.no_grad()
    def _power_steps(self, u: Tensor, n: int, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``n >= 1`` steps from ``u``: the new ``(u, v)`` and the estimate ``||A v||`` (a lower bound of ``||A||``)."""
        for _ in range(n):  # on local tensors (few calls per step)
            # u need not be normalised in between: v, normalised next, does not depend on u's scale
            v = _normalize(self._adjoint(u, w))
            u = self._operator(v, w)
        sigma = torch.linalg.vector_norm(u)
        return u / sigma.clamp_min(1e-12), v, sigma

    @torch.no_grad()
    def power_iteration(self, n: int) -> Tensor:
        """Run ``n`` power-iteration steps on the operator, updating ``u`` and ``v`` in place.

        Returns the last step's estimate ``||A v||`` (for ``n = 0`` the stored estimate ``sigma``).
        """
        if n == 0:
            return self.sigma
        with full_precision(self.weight.device.type):
            u, v, sigma = self._power_steps(self.u, n, self.weight.detach())
        self.u.copy_(u)
        self.v.copy_(v)
        return sigma

    @torch.no_grad()
    def _training_power_iteration(self) -> int:
        """The per-step update: ``n_power_iterations`` steps, then (``power_tol > 0``) on to the tolerance."""
        previous = self.sigma.clone() if self.power_tol > 0 else None
        sigma = self.power_iteration(self.n_power_iterations)
        steps = self.n_power_iterations
        # power_tol > 0: one host sync per check; warm-started, most steps stop at the first
        while (
            previous is not None
            and steps < self.max_power_iterations
            and abs(float(sigma - previous)) > self.power_tol * float(sigma)
        ):
            previous = sigma
            sigma = self.power_iteration(1)
            steps += 1
        return steps

    def _initialized(self) -> bool:
        """Whether the vectors exist: a Python flag first (reading the buffer costs a host sync on GPUs), the
        buffer once after construction or a load."""
        if not self._ready and bool(self.initialized):
            self._ready = True
        return self._ready

    def _ensure_initialized(self, x: Tensor | None) -> None:
        if self._initialized():
            return
        if x is None:
            raise RuntimeError(f"{type(self).__name__} has not seen an input yet; call it on data first")
        self._init_vectors(x)
        self.power_iteration(self.n_init_iterations)
        self.initialized.fill_(True)
        self._refresh_sigma()
        self._ready = True

    def normalized_weight(self, x: Tensor | None = None) -> Tensor:
        """The weight this forward applies: the training normalisation, or the certified one in eval mode.

        Computed in full precision even under autocast or TF32 (:mod:`pipeline.precision`): a bf16 power
        iteration misjudges sigma by ~0.4%, a TF32 one by ~0.1%, and the normalised weight (what the
        guarantee is about) would inherit it.
        """
        with full_precision(self.weight.device.type):
            if not self._initialized():  # x (a bf16 activation under --amp) is copied to float32 only here, once
                self._ensure_initialized(None if x is None else x.float())
            if not self.training:
                return self._eval_weight()
            if self._iterated_ahead:  # batched_power_iteration has run this forward's steps already
                self._iterated_ahead = False
                self.last_power_iterations = self.n_power_iterations
            elif not self.power_iteration_frozen:
                self.last_power_iterations = self._training_power_iteration()
            sigma = self._sigma_estimate(self.weight)  # u, v are constants for autograd
            self.sigma.copy_(sigma.detach())
            if self.lipschitz == "strict":
                # divide by at least a certified bound (no host sync); the gradient keeps the estimate's form
                floor = self._step_bound(self.weight.detach()).to(sigma.dtype)
                sigma = sigma * torch.clamp(floor / sigma.detach(), min=1.0)
            # W * min(1, c / sigma), written as one division by max(1, sigma / c): three kernels instead of four
            return self.weight / torch.clamp_min(sigma / self.coeff, 1.0)

    def _sigma_estimate(self, weight: Tensor) -> Tensor:
        """``u^T A(W) v``, differentiable in ``W``; ``u``, ``v`` cloned, as the next step updates them in place."""
        return (self.u.clone() * self._operator(self.v.clone(), weight)).sum()

    @torch.no_grad()
    def _refresh_sigma(self) -> None:
        self.sigma.copy_((self.u * self._operator(self.v, self.weight)).sum())

    # -- the eval-time guarantee ------------------------------------------------------------
    def _weight_key(self) -> tuple:
        w = self.weight
        # _version counts in-place changes (optimiser steps, load_state_dict); data_ptr catches a swapped tensor
        return (w._version, w.data_ptr(), w.dtype, w.device, self.coeff, self.lipschitz)

    def eval_normalization(self) -> EvalNormalization:
        """The eval-time normalisation of the current weight (recomputed only when the weight has changed)."""
        self._ensure_initialized(None)
        key = self._weight_key()
        if self._eval is None or self._eval.key != key:
            with self._certification_context():
                self._eval = self._normalize_for_eval(key, self.weight.detach().clone())
        return self._eval

    def certificate(self) -> EvalNormalization:
        """:meth:`eval_normalization` with its certified bound (raising ``sigma`` where an estimate fell short)."""
        norm = self.eval_normalization()
        if norm.proof is None:
            with self._certification_context():
                norm.proof = self._prove_norm(self.weight.detach().clone(), norm.reference)
            self._apply_proof(norm)
        return norm

    @contextmanager
    def _certification_context(self) -> Iterator[None]:
        # full precision whatever the caller's autocast or TF32, and ordinary tensors even under inference_mode
        with torch.inference_mode(False), torch.no_grad(), full_precision(self.weight.device.type):
            yield

    def _normalize_for_eval(self, key: tuple, w: Tensor) -> EvalNormalization:
        proof: CertifiedNorm | None
        if self.lipschitz == "strict":  # the map training applies: the step bound, with the latest estimate
            bound = float(self._step_bound(w))
            exact = self._step_bound_is_exact
            proof = CertifiedNorm(bound, bound if exact else None, "exact" if exact else "fft")
            reference, method, converged = max(bound, float(self.sigma)), "training", True
        else:
            reference, method, converged, proof = self._estimate_norm(w)
            if not converged:  # fall back to what can be proved
                proof = self._prove_norm(w, None)
        norm = EvalNormalization(key, self._divisor(reference, w), reference, method, converged, proof)
        self._apply_proof(norm)
        return norm

    def _apply_proof(self, norm: EvalNormalization) -> None:
        if norm.proof is None:
            return
        floor = norm.proof.bound / (1 + CERTIFIED_SLACK)
        if float(norm.sigma) < floor:
            if norm.reference_converged and norm.reference_method != "training":
                log.warning(
                    "%s: the converged %s estimate %.6g of ||W|| is below the certified bound %.6g / (1 + %g); "
                    "dividing by the bound instead",
                    type(self).__name__,
                    norm.reference_method,
                    norm.reference,
                    norm.proof.bound,
                    CERTIFIED_SLACK,
                )
            norm.sigma = self._divisor(floor, self.weight)

    @staticmethod
    def _divisor(value: float, like: Tensor) -> Tensor:
        sigma = torch.tensor(value, dtype=like.dtype, device=like.device)
        if float(sigma) < value:  # rounding to the weight's dtype must not shrink the divisor
            sigma = torch.nextafter(sigma, torch.tensor(math.inf, dtype=like.dtype, device=like.device))
        return sigma

    @torch.no_grad()
    def _power_estimate(self, w: Tensor) -> tuple[float, bool]:
        """Power iteration from the stored vectors (left untouched) to a relative change <= CERTIFY_POWER_TOL."""
        u, previous, steps = self.u.clone(), 0.0, 0
        while steps < CERTIFY_MAX_POWER_ITERATIONS:
            u, _, sigma_t = self._power_steps(u, 10, w)
            steps += 10
            sigma = float(sigma_t)
            if abs(sigma - previous) <= CERTIFY_POWER_TOL * sigma:
                return sigma, True
            previous = sigma
        return sigma, False

    def _eval_weight(self) -> Tensor:
        return self.weight * self.eval_normalization().sigma.reciprocal().mul(self.coeff).clamp(max=1.0)

    def effective_weight(self) -> Tensor:
        """The weight the layer applies in eval mode."""
        with torch.no_grad():
            return self._eval_weight()

    def certified_norm(self) -> float:
        """Certified upper bound of the operator norm of :meth:`effective_weight` (``<= c (1 + slack)``)."""
        norm = self.certificate()
        assert norm.proof is not None  # certificate() proves what it returns
        return min(1.0, self.coeff / float(norm.sigma)) * norm.proof.bound

    def training_norm_ratio(self) -> float:
        """Applied norm / c of a training forward with the current estimate (soft mode can exceed 1).

        Soft mode: measured with the eval-time reference norm (exact, Lanczos or the converged power
        iteration). Strict mode: with the certified bound (so at most ``1 + CERTIFIED_SLACK``).
        """
        norm = self.eval_normalization()
        if self.lipschitz == "strict":
            assert norm.proof is not None  # strict mode's normalisation carries its bound
            sigma = max(float(self.sigma), norm.proof.bound)
            return norm.proof.bound * min(1.0, self.coeff / sigma) / self.coeff
        return norm.reference * min(1.0, self.coeff / float(self.sigma)) / self.coeff

    def estimated_norm(self) -> float:
        """The power-iteration estimate of the effective operator norm, ``min(sigma, c)``."""
        return float(torch.clamp(self.sigma, max=self.coeff))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._ready = False  # re-read the loaded `initialized` flag on the next forward
        self._iterated_ahead = False  # steps taken for the previous weights do not count for the loaded ones
        self._eval = None
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
        spectral: SpectralConfig = SpectralConfig(),
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(spectral)
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

    def _batch_key(self) -> tuple:
        w = self.weight
        return (SpectralNormLinear, tuple(w.shape), w.dtype, w.device, self.n_power_iterations)

    def _sigma_estimate(self, weight: Tensor) -> Tensor:
        # u^T W v = <W, u v^T>: the outer product is a new tensor (no clones of u, v) and its gradient is W's
        return torch.dot(weight.flatten(), torch.outer(self.u, self.v).flatten())

    def _stacked_operator(self, v: Tensor, weight: Tensor) -> Tensor:  # (G, in), (G, out, in) -> (G, out)
        return torch.bmm(weight, v.unsqueeze(-1)).squeeze(-1)

    def _stacked_adjoint(self, u: Tensor, weight: Tensor) -> Tensor:  # (G, out), (G, out, in) -> (G, in)
        return torch.bmm(u.unsqueeze(1), weight).squeeze(1)

    _step_bound_is_exact = True

    def _step_bound(self, weight: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(weight.double(), ord=2)  # exact, and cheap for a matrix

    def _prove_norm(self, weight: Tensor, estimate: float | None) -> CertifiedNorm:
        norm = float(self._step_bound(weight))
        return CertifiedNorm(norm, norm, "exact")

    def _estimate_norm(self, weight: Tensor) -> tuple[float, str, bool, CertifiedNorm | None]:
        proof = self._prove_norm(weight, None)
        return proof.bound, "exact", True, proof

    def _init_vectors(self, x: Tensor) -> None:
        self.u = self.u.to(dtype=self.weight.dtype, device=self.weight.device)
        self.v = self.v.to(dtype=self.weight.dtype, device=self.weight.device)

    def forward_with_weight(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The output and the weight applied to get it (a closed-form vector-Jacobian product needs it)."""
        weight = self.normalized_weight(x)
        return F.linear(x, weight, self.bias), weight

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_weight(x)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"
            f", lipschitz={self.lipschitz}"
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
        spectral: SpectralConfig = SpectralConfig(),
        *,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__(spectral)
        padding = kernel_size // 2 if padding is None else padding
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if ref.bias is not None else None
        self.register_buffer("u", torch.empty(0))
        self.register_buffer("v", torch.empty(0))

    @property
    def input_hw(self) -> tuple[int, int] | None:
        """The spatial input size the operator norm refers to (``None`` before the first input)."""
        return tuple(self.v.shape[-2:]) if self.v.numel() else None  # type: ignore[return-value]

    @property
    def _seen_hw(self) -> tuple[int, int]:
        hw = self.input_hw
        if hw is None:
            raise RuntimeError("SpectralNormConv2d has not seen an input yet; its operator norm needs the input size")
        return hw

    def _output_padding(self) -> tuple[int, int]:
        return conv_output_padding(self.v.shape[-2:], self.u.shape[-2:], self.kernel_size, self.stride, self.padding)

    def _operator(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, stride=self.stride, padding=self.padding)

    def _adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(
            u, weight, stride=self.stride, padding=self.padding, output_padding=self._output_padding()
        )

    def _batch_key(self) -> tuple:
        w = self.weight
        shape = (tuple(w.shape), tuple(self.v.shape), self.stride, self.padding)
        return (SpectralNormConv2d, *shape, w.dtype, w.device, self.n_power_iterations)

    def _sigma_estimate(self, weight: Tensor) -> Tensor:
        # u^T conv(v, W) = <W, G>, G the weight gradient of conv(v, .) at output gradient u: one correlation of v and
        # u, without a graph, instead of a convolution and its backward per layer and step; the gradient in W is G
        with torch.no_grad():
            g = conv2d_weight(self.v, weight.shape, self.u, stride=self.stride, padding=self.padding)
        return torch.dot(weight.flatten(), g.flatten())

    def _stacked_operator(self, v: Tensor, weight: Tensor) -> Tensor:
        # G layers as one grouped convolution: v (G, 1, C_in, H, W), weight (G, C_out, C_in, k, k)
        g = weight.shape[0]
        out = F.conv2d(
            v.reshape(1, -1, *v.shape[-2:]), weight.flatten(0, 1), stride=self.stride, padding=self.padding, groups=g
        )
        return out.reshape(g, 1, -1, *out.shape[-2:])

    def _stacked_adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        g = weight.shape[0]
        out = F.conv_transpose2d(
            u.reshape(1, -1, *u.shape[-2:]),
            weight.flatten(0, 1),
            stride=self.stride,
            padding=self.padding,
            output_padding=self._output_padding(),
            groups=g,
        )
        return out.reshape(g, 1, -1, *out.shape[-2:])

    def _step_bound(self, weight: Tensor) -> Tensor:
        return conv_operator_norm_bound_tensor(weight, self._seen_hw, self.padding)

    def _prove_norm(self, weight: Tensor, estimate: float | None) -> CertifiedNorm:
        return conv_operator_norm(
            weight, self._seen_hw, self.stride, self.padding, slack=CERTIFIED_SLACK, estimate=estimate
        )

    def _estimate_norm(self, weight: Tensor) -> tuple[float, str, bool, CertifiedNorm | None]:
        if conv_gram_dim(weight, self._seen_hw, self.stride, self.padding) <= GRAM_MAX_DIM:
            proof = self._prove_norm(weight, None)  # exact, and as cheap as an estimate
            return proof.bound, "exact", True, proof
        value, converged = conv_operator_norm_estimate(weight, self._seen_hw, self.stride, self.padding)
        if not converged:
            value, converged = self._power_estimate(weight)
            return value, "power", converged, None
        return value, "lanczos", True, None

    def _init_vectors(self, x: Tensor) -> None:
        shape = (1, self.in_channels, *x.shape[-2:])
        v = _normalize(torch.randn(shape, dtype=self.weight.dtype, device=self.weight.device))
        self.v = v
        self.u = _normalize(self._operator(v, self.weight.detach()))

    def forward_with_weight(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The output and the weight applied to get it (a closed-form vector-Jacobian product needs it)."""
        if self.v.numel() and tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"SpectralNormConv2d was normalised for inputs of size {self.input_hw}, got {tuple(x.shape[-2:])}; "
                "the operator norm depends on the input size"
            )
        weight = self.normalized_weight(x)
        return F.conv2d(x, weight, self.bias, stride=self.stride, padding=self.padding), weight

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_weight(x)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, coeff={self.coeff}, n_power_iterations={self.n_power_iterations}, "
            f"lipschitz={self.lipschitz}"
        )


SPECTRAL_LAYERS = (SpectralNormLinear, SpectralNormConv2d)


def spectral_layers(module: nn.Module) -> list[_SpectralNorm]:
    """Every spectrally normalised layer inside ``module`` (looked up once per module: models do not change)."""
    cached = module.__dict__.get("_spectral_layers_cache")
    if cached is None:
        cached = [m for m in module.modules() if isinstance(m, _SpectralNorm)]
        module.__dict__["_spectral_layers_cache"] = cached
    return cached


@torch.no_grad()
def batched_power_iteration(module: nn.Module) -> None:
    """Run the power-iteration steps of the coming training forward now, stacked across layers of one shape.

    Models call this at the start of a training forward. Layers whose operators have the same shape
    (linear maps of one size; convolutions of one kernel, stride, padding and input size) take their
    ``n_power_iterations`` steps together: one batched matrix product, or one grouped convolution, per
    step for the whole group instead of one per layer. The arithmetic per layer is the same; each
    layer's next training forward then skips its own steps. Layers that are not ready, frozen, in
    eval mode or adaptive (``power_tol > 0``), or alone in their group, iterate in their forward as before.
    """
    groups: dict[tuple, list[_SpectralNorm]] = {}
    for layer in spectral_layers(module):
        fixed_steps = layer.power_tol == 0 and not layer.power_iteration_frozen
        if layer.training and fixed_steps and not layer._iterated_ahead and layer._initialized():
            groups.setdefault(layer._batch_key(), []).append(layer)
    for layers in groups.values():
        if len(layers) > 1:
            _stacked_power_steps(layers)


def _stacked_power_steps(layers: list[_SpectralNorm]) -> None:
    first = layers[0]
    with full_precision(first.weight.device.type):
        w = torch.stack([layer.weight.detach() for layer in layers])
        u = torch.stack([layer.u for layer in layers])
        for _ in range(first.n_power_iterations):
            v = _normalize_each(first._stacked_adjoint(u, w))
            u = first._stacked_operator(v, w)
        u = _normalize_each(u)
    for layer, u_i, v_i in zip(layers, u, v, strict=True):
        layer.u.copy_(u_i)
        layer.v.copy_(v_i)
        layer._iterated_ahead = True


@contextmanager
def frozen_power_iteration(module: nn.Module) -> Iterator[None]:
    """Hold every spectral normalisation inside ``module`` fixed: no power-iteration update, even in training.

    The normalised weight stays differentiable (through the stored ``u``, ``v``); only the estimate
    stops moving, so an iterative solver sees one and the same operator at every evaluation.
    """
    with temporarily_set(spectral_layers(module), "power_iteration_frozen", True):
        yield
