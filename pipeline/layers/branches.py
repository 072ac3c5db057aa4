"""Residual branches ``g = W_k o phi o ... o phi o W_1`` for invertible residual blocks.

With spectrally normalised ``W_i`` (coefficient ``c``) and 1-Lipschitz ``phi``, ``Lip(g) <= c^k`` in
eval mode (each layer applies its certified weight), and :func:`branch_lipschitz_bound` certifies it.
``lipschitz="strict"`` makes it hold at every training forward too.
``spectral=None`` builds the same branch unconstrained (the paper's "vanilla" ResNet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.layers.activations import LipSwish, make_activation
from pipeline.layers.layer_norms import layer_operator_norm
from pipeline.layers.operator_norm import conv_output_padding
from pipeline.layers.spectral import SpectralConfig, SpectralNormConv2d, SpectralNormLinear


def _linear(n_in: int, n_out: int, spectral: SpectralConfig | None) -> nn.Module:
    if spectral is None:
        return nn.Linear(n_in, n_out)
    return SpectralNormLinear(n_in, n_out, spectral)


def _conv(n_in: int, n_out: int, kernel: int, spectral: SpectralConfig | None) -> nn.Module:
    if kernel % 2 == 0:
        raise ValueError(f"kernel sizes must be odd (size-preserving padding), got {kernel}")
    if spectral is None:
        return nn.Conv2d(n_in, n_out, kernel, padding=kernel // 2)
    return SpectralNormConv2d(n_in, n_out, kernel, spectral)


def mlp_branch(
    dim: int,
    hidden: Sequence[int] = (64, 64, 64),
    *,
    activation: str = "elu",
    spectral: SpectralConfig | None = SpectralConfig(),
    preactivation: bool = False,
) -> nn.Sequential:
    """``dim -> hidden[0] -> ... -> hidden[-1] -> dim`` with an activation between linear maps.

    ``spectral=None``: unconstrained linear maps (not an invertible block's branch)."""
    widths = [dim, *hidden, dim]
    layers: list[nn.Module] = [make_activation(activation)] if preactivation else []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if i > 0:
            layers.append(make_activation(activation))
        layers.append(_linear(n_in, n_out, spectral))
    return nn.Sequential(*layers)


def conv_branch(
    channels: int,
    hidden: int,
    *,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    activation: str = "elu",
    spectral: SpectralConfig | None = SpectralConfig(),
    preactivation: bool = False,
    batchnorm: bool = False,
) -> nn.Sequential:
    """The paper's bottleneck ``channels -> hidden -> ... -> hidden -> channels`` (3x3, 1x1, 3x3).

    ``batchnorm`` puts BatchNorm before each activation (only for the vanilla baseline: BatchNorm
    has no Lipschitz bound and so voids the invertibility guarantee). ``spectral=None``: unconstrained.
    """
    if batchnorm and spectral is not None:
        raise ValueError("batchnorm inside the branch voids the Lipschitz guarantee; use it only with spectral=None")
    widths = [channels] + [hidden] * (len(kernel_sizes) - 1) + [channels]
    layers: list[nn.Module] = []

    def act(n: int) -> None:
        if batchnorm:
            layers.append(nn.BatchNorm2d(n))
        layers.append(make_activation(activation))

    for i, (n_in, n_out, k) in enumerate(zip(widths[:-1], widths[1:], kernel_sizes, strict=True)):
        if i > 0 or preactivation:
            act(n_in)
        layers.append(_conv(n_in, n_out, k, spectral))
    return nn.Sequential(*layers)


def branch_linear_layers(branch: nn.Module) -> list[nn.Module]:
    """The linear operators of a branch, in order."""
    return [
        m for m in branch.modules() if isinstance(m, (nn.Linear, nn.Conv2d, SpectralNormLinear, SpectralNormConv2d))
    ]


def batchnorm_lipschitz(layer: nn.modules.batchnorm._BatchNorm) -> float:
    """Lipschitz constant of BatchNorm in eval mode: ``max |gamma| / sqrt(running_var + eps)``."""
    if layer.running_var is None:
        raise ValueError("BatchNorm without running statistics has no fixed eval-mode map")
    scale = torch.ones_like(layer.running_var) if layer.weight is None else layer.weight.detach().abs()
    return float((scale / torch.sqrt(layer.running_var + layer.eps)).max())


def branch_lipschitz_bound(
    branch: nn.Module, *, method: str = "certified", input_hw: tuple[int, int] | None = None
) -> float:
    """Upper bound on ``Lip(g)`` in eval mode: the product of its linear layers' operator norms.

    Valid because every activation here is 1-Lipschitz; BatchNorm (vanilla baseline only) enters
    with its eval-mode per-channel scale.
    """
    bound = 1.0
    for layer in branch.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            bound *= batchnorm_lipschitz(layer)
    for layer in branch_linear_layers(branch):
        bound *= layer_operator_norm(layer, method=method, input_hw=input_hw)
    return bound


# --- the Jacobian of an MLP branch in closed form ----------------------------------------------------------
# each activation's value and derivative from shared intermediates (the derivative stays differentiable: the
# log-det's gradient needs the second derivative)
def _elu(m: nn.ELU, x: Tensor) -> tuple[Tensor, Tensor]:
    value = F.elu(x, m.alpha)
    return value, torch.where(x > 0, torch.ones_like(x), value + m.alpha)  # alpha e^x = elu(x) + alpha for x <= 0


def _softplus(m: nn.Softplus, x: Tensor) -> tuple[Tensor, Tensor]:
    linear = x * m.beta > m.threshold
    return F.softplus(x, m.beta, m.threshold), torch.where(linear, torch.ones_like(x), torch.sigmoid(m.beta * x))


def _relu(m: nn.ReLU, x: Tensor) -> tuple[Tensor, Tensor]:
    return F.relu(x), (x > 0).to(x.dtype)


def _lipswish(m: LipSwish, x: Tensor) -> tuple[Tensor, Tensor]:
    z = F.softplus(m.beta_raw) * x
    s = torch.sigmoid(z)
    # d/dx x sigmoid(z) = s + z s (1 - s); sigmoid_backward(z, s) is z s (1 - s) in one twice-differentiable kernel
    return x * s / 1.1, (s + torch.ops.aten.sigmoid_backward(z, s)) / 1.1


ACTIVATION_VALUE_AND_DERIVATIVE: dict[type[nn.Module], Callable[[Any, Tensor], tuple[Tensor, Tensor]]] = {
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.ReLU: _relu,
    LipSwish: _lipswish,
}


def has_structured_jacobian(branch: object) -> TypeGuard[nn.Sequential]:
    """Whether :func:`forward_with_jacobian` handles ``branch``: linear maps (dense, or convolutions with zero
    padding) and activations of known derivative, in sequence."""
    return isinstance(branch, nn.Sequential) and all(
        isinstance(m, (nn.Linear, SpectralNormLinear, SpectralNormConv2d))
        or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple))
        or type(m) in ACTIVATION_VALUE_AND_DERIVATIVE
        for m in branch
    )


@dataclass(frozen=True)
class _LinearMap:
    """One linear layer of a branch at the weight its forward applied (kept with that weight's graph)."""

    module: nn.Linear | SpectralNormLinear | nn.Conv2d | SpectralNormConv2d
    weight: Tensor
    input_shape: torch.Size

    def _conv_arguments(self) -> tuple[Any, Any, Any, int]:
        m = self.module  # a convolution: has_structured_jacobian admits tuple paddings only (no "same")
        dilation, groups = (m.dilation, m.groups) if isinstance(m, nn.Conv2d) else (1, 1)
        return m.stride, m.padding, dilation, groups

    def apply(self, t: Tensor) -> Tensor:  # A t, no bias: the Jacobian of an affine map is its linear part
        if isinstance(self.module, (nn.Linear, SpectralNormLinear)):
            return F.linear(t, self.weight)
        return F.conv2d(t, self.weight, None, *self._conv_arguments())

    def adjoint(self, u: Tensor, differentiable: bool = False) -> Tensor:
        """``u^T A`` at the weight's value; ``differentiable``: with the weight's graph (and ``u``'s)."""
        weight = self.weight if differentiable else self.weight.detach()
        if isinstance(self.module, (nn.Linear, SpectralNormLinear)):
            return u @ weight
        # a transposed convolution: 20-40% less CPU than the input-gradient kernel autograd runs for the same product
        # at the flows' small shapes (one thread); output_padding restores the input size a stride rounded away
        stride, padding, dilation, groups = self._conv_arguments()
        output_padding = conv_output_padding(
            self.input_shape[-2:], u.shape[-2:], weight.shape[-2:], stride, padding, dilation
        )
        return F.conv_transpose2d(u, weight, None, stride, padding, output_padding, groups, dilation)


@dataclass(frozen=True)
class _Activation:
    """One activation of a branch: its input (with the forward's graph) and its derivative there (without)."""

    module: nn.Module
    input: Tensor
    derivative: Tensor

    def differentiable_derivative(self) -> Tensor:
        # recomputed from the input rather than kept with its graph from the forward: a step's memory stays that of
        # g(x)'s graph, for a few elementwise operations in the backward
        return ACTIVATION_VALUE_AND_DERIVATIVE[type(self.module)](self.module, self.input)[1]


@dataclass(frozen=True)
class BranchJacobian:
    """``J_g(x)`` of a branch at the inputs of one forward, as its factors ``W_k D_{k-1} ... D_1 W_1`` (the applied
    weights ``W_i`` and the activations' derivatives ``D_i``), never formed."""

    factors: tuple[_LinearMap | _Activation, ...]  # in forward order

    def vjp(self, u: Tensor) -> Tensor:
        """``u^T J``: the adjoints in reverse, one transposed convolution or matrix product per linear map and one
        multiplication per activation, with no graph (not differentiable)."""
        for factor in reversed(self.factors):
            u = u * factor.derivative if isinstance(factor, _Activation) else factor.adjoint(u)
        return u

    def differentiable_vjp(self, u: Tensor) -> Tensor:
        """``u^T J`` differentiable in ``u``, the weights and, through the activations' derivatives, ``x``: the
        products of a series that is backpropagated, without ``torch.autograd.grad`` (the double backward it would
        need is then an ordinary backward, and ``torch.compile`` traces the step whole)."""
        for factor in reversed(self.factors):
            if isinstance(factor, _Activation):
                u = u * factor.differentiable_derivative()
            else:
                u = factor.adjoint(u, differentiable=True)
        return u

    def jvp(self, t: Tensor) -> Tensor:
        """``J t``, differentiable in the weights and, through the activations' derivatives, in ``x`` (when the
        forward recorded a graph): ``d/d(x, θ) <w, J v>``, the Neumann gradient, is then one first-order backward
        instead of the double backward of a vector-Jacobian product."""
        for factor in self.factors:
            t = t * factor.differentiable_derivative() if isinstance(factor, _Activation) else factor.apply(t)
        return t


def forward_with_jacobian(branch: nn.Sequential, x: Tensor) -> tuple[Tensor, BranchJacobian]:
    """``g(x)`` and its Jacobian at ``x`` as a :class:`BranchJacobian` (check the branch with
    :func:`has_structured_jacobian`).

    Each layer applies its weight as its own forward does (spectral normalisation included, its power iteration
    once); autograd's graph is recorded when grad mode is on, as ``branch(x)`` would, and reaches the activations'
    derivatives too. The log-det series takes several vector-Jacobian products per step: here each costs the
    layers' adjoints and no pass of the autograd engine.
    """
    factors: list[_LinearMap | _Activation] = []
    h = x
    for m in branch:
        if isinstance(m, (SpectralNormConv2d, SpectralNormLinear)):
            h_in = h
            h, weight = m.forward_with_weight(h)
            factors.append(_LinearMap(m, weight, h_in.shape))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            factors.append(_LinearMap(m, m.weight, h.shape))
            h = m(h)
        else:
            h_in = h
            h, derivative = ACTIVATION_VALUE_AND_DERIVATIVE[type(m)](m, h)
            factors.append(_Activation(m, h_in, derivative.detach()))
    return h, BranchJacobian(tuple(factors))


def has_closed_form_jacobian(branch: object) -> TypeGuard[nn.Sequential]:
    """Whether :func:`mlp_jacobian` handles ``branch``: a sequence of linear maps and known activations."""
    return isinstance(branch, nn.Sequential) and all(
        isinstance(m, (nn.Linear, SpectralNormLinear)) or type(m) in ACTIVATION_VALUE_AND_DERIVATIVE for m in branch
    )


def mlp_jacobian(branch: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """``g(x)`` and the Jacobian ``J_g(x)`` (B, d_out, d_in) of an MLP branch, in one forward pass.

    ``J = W_k D_{k-1} ... D_1 W_1`` with ``D_i`` the diagonal of the activations' derivatives, built
    alongside the forward (each layer applies the same weight as its own forward, spectral normalisation
    included). Differentiable, so a loss on ``J`` (a log-det) trains the branch by ordinary backprop: for
    few dimensions ``d`` this replaces ``d`` vector-Jacobian products and their double backward, and costs
    about ``d`` forwards of the matrix products (check with :func:`has_closed_form_jacobian`).
    """
    if x.dim() != 2:
        raise ValueError(f"mlp_jacobian needs inputs of shape (B, d), got {tuple(x.shape)}")
    # the transpose J^T (B, d_in, width): a linear map is then one matrix product over all rows, B * d_in of them
    h, jac_t = x, None  # None: the identity; unbatched until the first activation
    for m in branch:
        if isinstance(m, (nn.Linear, SpectralNormLinear)):
            weight = m.normalized_weight(h) if isinstance(m, SpectralNormLinear) else m.weight
            h = F.linear(h, weight, m.bias)
            jac_t = weight.t() if jac_t is None else F.linear(jac_t, weight)  # J^T W^T, as one matrix product
        else:
            h, derivative = ACTIVATION_VALUE_AND_DERIVATIVE[type(m)](m, h)
            jac_t = torch.diag_embed(derivative) if jac_t is None else jac_t * derivative.unsqueeze(-2)
    if jac_t is None:
        jac_t = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return h, jac_t.expand(x.shape[0], *jac_t.shape[-2:]).transpose(-2, -1)
