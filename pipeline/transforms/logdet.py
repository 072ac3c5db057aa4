"""Estimators of ``log det(I + J_g(x))`` for a residual branch ``g`` (Algorithm 2 of the paper, and Residual Flows).

Each estimator is a callable ``estimator(g, x) -> (g(x), logdet)`` returning the branch output
(so the block needs a single forward of ``g``) and a per-sample log-determinant. When autograd is
enabled the result is differentiable (for training); under ``torch.no_grad()`` the estimate is
computed with a local graph that is freed straight after, and returned detached.

* :class:`ExactLogDet`: the full Jacobian, brute force (low dimensions, tests).
* :class:`PowerSeriesLogDet`: ``sum_{k<=n} (-1)^{k+1} tr(J^k)/k`` with Hutchinson traces (the paper;
  biased by the truncation, Theorem 3).
* :class:`RussianRouletteLogDet`: the same series with a random number of terms, each term
  reweighted by the inverse probability of being reached, so the estimate is *unbiased*
  (Chen et al. 2019, Residual Flows): ``n_exact_terms`` always, then ``N`` more with ``N``
  geometric or Poisson.

Both series estimators take ``gradient=``:

* ``"backprop"``: differentiate through the series (a graph through every vector-Jacobian product;
  memory grows with the number of terms).
* ``"neumann"``: the Neumann-series gradient ``d/dθ log det(I+J) = tr((I+J)^{-1} dJ/dθ)``, estimated
  by ``w^T (dJ/dθ) v`` with ``w^T = sum_k (-1)^k c_{k+1} v^T J^k`` (the same weights ``c`` as the value,
  so it is the gradient of the value's expectation). The series runs once in the forward pass with
  no graph and yields both the log-det value and ``w``; backward differentiates ``w^T J v``, weighted
  per sample by the upstream gradient: for a branch of linear maps and elementwise activations
  (:func:`~pipeline.layers.branches.forward_with_jacobian`) ``J v`` is a tangent pass and the backward
  first order, otherwise a double backward of ``w^T J``. Memory does not
  grow with the number of terms, and unlike the public implementations the returned log-det *value*
  is the estimate itself, not a surrogate scalar whose value means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard, cast

import torch
from torch import Tensor, nn

from pipeline.layers.branches import (
    BranchJacobian,
    forward_with_jacobian,
    has_closed_form_jacobian,
    has_structured_jacobian,
    mlp_jacobian,
)
from pipeline.training.host_syncs import host_value

Branch = Callable[[Tensor], Tensor]

PROBES = ("gaussian", "rademacher")
GRADIENTS = ("backprop", "neumann")
ROULETTE_DISTRIBUTIONS = ("geometric", "poisson")


def sample_probe(like: Tensor, kind: str) -> Tensor:
    """Hutchinson probe with ``E[v] = 0`` and ``Cov(v) = I``."""
    if kind == "gaussian":
        return torch.randn_like(like)
    if kind == "rademacher":
        return torch.randint_like(like, low=0, high=2).mul_(2).sub_(1)
    raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(dim=1)


def _logabsdet_identity_plus(jac: Tensor) -> Tensor:
    """``log|det(I + J)|`` per sample; in closed form for 1x1 and 2x2 (a batched LU costs far more there)."""
    d = jac.shape[-1]
    if d == 1:
        return torch.log(torch.abs(1 + jac[:, 0, 0]))
    if d == 2:  # one unbind (its backward is one stack) instead of four selects
        a, b, c, e = jac.reshape(-1, 4).unbind(1)
        return torch.log(torch.abs((1 + a) * (1 + e) - b * c))
    return torch.linalg.slogdet(torch.eye(d, dtype=jac.dtype, device=jac.device) + jac).logabsdet


def _closed_form_jacobian(g: nn.Sequential, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
    """``g(x)`` and ``J_g(x)`` of an MLP branch (:func:`~pipeline.layers.branches.mlp_jacobian`), without a
    graph when nothing will be differentiated."""
    if differentiable:
        return mlp_jacobian(g, x)
    with torch.no_grad():
        return mlp_jacobian(g, x)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: a bf16/fp16 sum of terms would round each partial sum to 3 significant digits."""
    return torch.promote_types(dtype, torch.float32)


class LogDetEstimator:
    """Base class: ``__call__(g, x) -> (g(x), log det(I + J_g(x)))`` per sample."""

    name = "base"

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def expected_vjps(self) -> float:
        """Expected vector-Jacobian products per call and probe (the cost, in backward passes of ``g``)."""
        return math.nan

    def __call__(self, g: Branch, x: Tensor) -> tuple[Tensor, Tensor]:
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            gx, logdet = self.estimate(g, x, differentiable)
        if not differentiable:
            gx, logdet = gx.detach(), logdet.detach()
        return gx, logdet


@dataclass(frozen=True)
class ExactLogDet(LogDetEstimator):
    """Brute force: the full Jacobian, then ``log|det|``.

    The Jacobian of an MLP branch on vectors is built in closed form alongside its forward
    (:func:`~pipeline.layers.branches.mlp_jacobian`); any other branch takes ``d`` backward passes
    (batched with vmap). ``O(B d^2)`` memory, so it is limited to ``max_dim`` dimensions per sample; use
    it for low-dimensional data and for testing.
    """

    max_dim: int = 1024
    name = "exact"

    def __post_init__(self) -> None:
        if self.max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {self.max_dim}")

    def expected_vjps(self) -> float:
        return float(self.max_dim)

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        batch, d = x.shape[0], math.prod(x.shape[1:])
        if d > self.max_dim:
            raise ValueError(
                f"exact log-determinant needs the full {d}x{d} Jacobian per sample, above max_dim={self.max_dim}; "
                "use the 'power_series' estimator for this dimension (or raise max_dim if memory allows)"
            )
        if x.dim() == 2 and has_closed_form_jacobian(g):
            gx, jac = _closed_form_jacobian(g, x, differentiable)
            return gx, _logabsdet_identity_plus(jac)
        gx = g(x)
        basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
        basis = basis.expand(d, batch, *x.shape[1:])
        # rows[i, b] = e_i^T J_g(x_b)
        (rows,) = torch.autograd.grad(gx, x, basis, is_grads_batched=True, create_graph=differentiable)
        return gx, _logabsdet_identity_plus(rows.reshape(d, batch, d).transpose(0, 1))


@dataclass(frozen=True, kw_only=True)
class _SeriesLogDet(LogDetEstimator):
    """``sum_{k=1}^{m} (-1)^{k+1} c_k v^T J^k v / k`` with Hutchinson probes ``v``.

    Subclasses choose the number of terms ``m`` and the weights ``c_k`` (:meth:`series_weights`,
    drawn afresh for every probe). Each probe costs ``m`` vector-Jacobian products. For an MLP branch on
    vectors of dimension ``d`` at most the expected number of products, ``J`` itself is cheaper
    (:func:`~pipeline.layers.branches.mlp_jacobian`, about ``d`` forwards of the matrix products): the products
    are then ``(B, d) x (B, d, d)`` multiplications, with the same probes, weights and value.
    """

    n_probes: int = 1
    probe: str = "gaussian"
    gradient: str = "backprop"

    def __post_init__(self) -> None:
        if not isinstance(self.n_probes, int) or self.n_probes < 1:
            raise ValueError(f"n_probes must be an integer >= 1, got {self.n_probes!r}")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; choose one of {PROBES}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {self.gradient!r}; choose one of {GRADIENTS}")

    def series_weights(self) -> list[float]:
        """``[c_1, ..., c_m]`` for one probe (random for the Russian roulette)."""
        raise NotImplementedError

    def series(self, vjp: Callable[[Tensor], Tensor], x: Tensor, *, neumann: bool) -> tuple[Tensor, list]:
        """The averaged value over probes and, with ``neumann``, each probe's ``(w, v)``; ``vjp(u) = u^T J``.

        ``w = sum_{k=0}^{m-1} (-1)^k c_{k+1} J^{T k} v`` is the Neumann vector: ``w^T (dJ) v`` estimates
        the derivative of the value's expectation. It reuses the value's vector-Jacobian products.
        """
        acc = _accumulation_dtype(x.dtype)
        value = x.new_zeros(x.shape[0], dtype=acc)
        pairs = []
        for _ in range(self.n_probes):
            weights = self.series_weights()
            v = sample_probe(x, self.probe)
            u = v  # after k products, u = (J^T)^k v, i.e. the row vector v^T J^k
            w = v * weights[0] if weights else torch.zeros_like(v)  # no terms drawn: value and gradient 0
            for k, c in enumerate(weights, start=1):
                u = vjp(u)
                value = value + ((-1) ** (k + 1) * c / k) * _flat_dot(u.to(acc), v.to(acc))
                if neumann and k < len(weights):
                    w = w + ((-1) ** k * weights[k]) * u  # weights[k] = c_{k+1} weights v^T J^k
            if neumann:
                pairs.append((w, v))
        return value / self.n_probes, pairs

    def uses_closed_form_jacobian(self, g: Branch, x: Tensor) -> TypeGuard[nn.Sequential]:
        """Whether ``J`` itself is cheaper than the series' products: an MLP branch on few dimensions."""
        products = self.expected_vjps() * self.n_probes
        return x.dim() == 2 and x.shape[1] <= products and has_closed_form_jacobian(g)

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        if self.uses_closed_form_jacobian(g, x):
            gx, jac = _closed_form_jacobian(g, x, differentiable)
            return gx, self._series_of_jacobian(jac, x, differentiable)
        if differentiable and self.gradient == "neumann":
            if not isinstance(g, nn.Module):
                raise TypeError("the Neumann gradient needs the branch as an nn.Module (its parameters get gradients)")
            params = [p for p in g.parameters() if p.requires_grad]
            return _NeumannLogDet.apply(self, g, x, *params)
        # backprop through the series: autograd's products with their graph; evaluation: no graph at all
        gx, vjp, _ = _forward_with_products(g, x, create_graph=differentiable, output_graph=differentiable)
        value, _ = self.series(vjp, x, neumann=False)
        return gx, value

    def _series_of_jacobian(self, jac: Tensor, x: Tensor, differentiable: bool) -> Tensor:
        """The series with ``J`` at hand; the Neumann gradient as ``d/d(x, θ) mean_probes w^T J v`` by backprop."""
        neumann = differentiable and self.gradient == "neumann"
        fixed = jac.detach() if neumann else jac
        value, pairs = self.series(lambda u: torch.bmm(u.unsqueeze(1), fixed).squeeze(1), x, neumann=neumann)
        if not neumann:
            return value
        surrogate = cast(Tensor, sum(_flat_dot(torch.bmm(w.unsqueeze(1), jac).squeeze(1), v) for w, v in pairs))
        surrogate = surrogate / len(pairs)
        return value + (surrogate - surrogate.detach())  # the estimate's value, the Neumann gradient


@dataclass(frozen=True, kw_only=True)
class PowerSeriesLogDet(_SeriesLogDet):
    """Truncated power series ``sum_{k=1}^{n} (-1)^{k+1} tr(J^k) / k`` with Hutchinson traces.

    ``v^T J^k v`` is computed by ``k`` vector-Jacobian products, never forming ``J``. Biased by the
    truncation (bounded by Theorem 3, see :mod:`pipeline.bounds`); unbiased in the trace.
    """

    n_terms: int = 5
    name = "power_series"

    def __post_init__(self) -> None:
        if not isinstance(self.n_terms, int) or self.n_terms < 1:
            raise ValueError(f"n_terms must be an integer >= 1, got {self.n_terms!r}")
        super().__post_init__()

    def series_weights(self) -> list[float]:
        return [1.0] * self.n_terms

    def expected_vjps(self) -> float:
        return float(self.n_terms)


@dataclass(frozen=True, kw_only=True)
class RussianRouletteLogDet(_SeriesLogDet):
    """Unbiased series: ``n_exact_terms`` always, then ``N`` more, term ``k`` weighted by ``1/P(reached)``.

    ``N ~ Geometric(p)`` on ``{1, 2, ...}`` (``P(N >= j) = (1-p)^{j-1}``) or ``N ~ Poisson(rate)``
    (``P(N >= j) = P(Gamma(j) <= rate)``). The expectation over ``N`` is the infinite series, i.e. the
    exact ``log det(I + J)``; the variance is finite when the terms decay faster than the weights
    grow (for the geometric, roughly ``rho(J)^2 < 1 - p``). One ``N`` per probe and call, shared by
    the batch. Expected cost ``n_exact_terms + E[N]`` vector-Jacobian products per probe.
    """

    n_exact_terms: int = 2
    distribution: str = "geometric"
    p: float = 0.5  # geometric success probability: E[N] = 1/p
    rate: float = 2.0  # Poisson mean: E[N] = rate
    gradient: str = "neumann"
    name = "russian_roulette"

    def __post_init__(self) -> None:
        if not isinstance(self.n_exact_terms, int) or self.n_exact_terms < 0:
            raise ValueError(f"n_exact_terms must be an integer >= 0, got {self.n_exact_terms!r}")
        if self.distribution not in ROULETTE_DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; choose one of {ROULETTE_DISTRIBUTIONS}")
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"the geometric parameter p must be in (0, 1), got {self.p}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"the Poisson rate must be > 0, got {self.rate}")
        super().__post_init__()

    def survival(self, j: int) -> float:
        """``P(N >= j)``."""
        if j <= (1 if self.distribution == "geometric" else 0):
            return 1.0
        if self.distribution == "geometric":
            return (1.0 - self.p) ** (j - 1)
        # P(Poisson(rate) >= j) = P(Gamma(j, 1) <= rate): the regularised lower incomplete gamma, no cancellation
        return float(torch.special.gammainc(torch.tensor(float(j), dtype=torch.float64), torch.tensor(self.rate)))

    def draw(self) -> int:
        """One draw of ``N`` from the global CPU generator (reproducible, checkpointed with the RNG state): a host
        tensor on every device, so reading it waits for no GPU."""
        if self.distribution == "geometric":
            return int(host_value(torch.empty((), dtype=torch.float64).geometric_(self.p)))
        return int(host_value(torch.poisson(torch.tensor(self.rate, dtype=torch.float64))))

    def series_weights(self) -> list[float]:
        extra = self.draw()
        return [1.0] * self.n_exact_terms + [1.0 / self.survival(j) for j in range(1, extra + 1)]

    def expected_vjps(self) -> float:
        return self.n_exact_terms + (1.0 / self.p if self.distribution == "geometric" else self.rate)


def _forward_with_products(
    g: Branch, x: Tensor, *, create_graph: bool, output_graph: bool
) -> tuple[Tensor, Callable[[Tensor], Tensor], BranchJacobian | None]:
    """``g(x)``, the series' product ``u -> u^T J_g(x)`` and, where the branch is structured, its Jacobian's factors.

    Where the branch is structured the products are taken in closed form from the factors
    (:func:`~pipeline.layers.branches.forward_with_jacobian`): without a graph (``create_graph=False``; ``g(x)``
    keeps its graph only with ``output_graph``), or, under ``torch.compile``, differentiable (``create_graph=True``: a
    backpropagated series, the same values and gradients as autograd's double backward, and no
    ``torch.autograd.grad`` to break the graph on; eagerly autograd's products are ~5% cheaper, measured on the quick
    flow). Otherwise by backward passes through ``g(x)``, which then always has its graph.
    """
    if has_structured_jacobian(g):
        if create_graph and torch.compiler.is_compiling():
            gx, jacobian = forward_with_jacobian(g, x)
            return gx, jacobian.differentiable_vjp, None
        if not create_graph:
            with torch.set_grad_enabled(output_graph):
                gx, jacobian = forward_with_jacobian(g, x)
            return gx, jacobian.vjp, jacobian
    gx = g(x)
    return gx, _vjp_of(gx, x, create_graph=create_graph), None


def _vjp_of(gx: Tensor, x: Tensor, *, create_graph: bool) -> Callable[[Tensor], Tensor]:
    """``u -> u^T J_g(x)`` by one backward pass through ``gx = g(x)``."""

    def vjp(u: Tensor) -> Tensor:
        return torch.autograd.grad(gx, x, u, create_graph=create_graph, retain_graph=True)[0]

    return vjp


class _NeumannLogDet(torch.autograd.Function):
    """``(g(x), logdet)`` whose log-det gradient is the Neumann estimate; no graph is kept through the series.

    Forward: ``g(x)`` with its graph, then the series without one (value and Neumann vectors ``w``).
    Backward: ``d/d(x, θ) sum_i a_i w_i^T J(x_i) v_i`` (``a`` the upstream per-sample gradient of the
    log-det), merged with the ordinary backward of ``g(x)`` in one pass: through a tangent pass ``J v``
    where the branch's Jacobian is structured (first order, about 10% of a training step cheaper than
    the alternative), else through ``w^T J`` by autograd (a double backward).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, estimator: _SeriesLogDet, branch: nn.Module, x: Tensor, *params: Tensor):
        ctx.set_materialize_grads(False)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            gx, vjp, jacobian = _forward_with_products(branch, x_, create_graph=False, output_graph=True)
            value, pairs = estimator.series(vjp, x_, neumann=True)
        ctx.jacobian = jacobian  # with its graph to the weights and the activations' inputs, as g(x) below
        # g(x) is saved with its graph (an intermediate keeps its grad_fn): the engine releases it after a
        # plain backward and keeps it under retain_graph=True, as for any built-in op
        ctx.n_params, ctx.n_probes = len(params), len(pairs)
        ctx.save_for_backward(x_, gx, *params, *(w for w, _ in pairs), *(v for _, v in pairs))
        return gx.detach(), value.detach()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_gx: Tensor | None, grad_value: Tensor | None):
        x_, gx, *rest = ctx.saved_tensors
        params, ws, vs = rest[: ctx.n_params], rest[ctx.n_params : -ctx.n_probes], rest[-ctx.n_probes :]
        outputs, grad_outputs = [], []
        with torch.enable_grad():
            if grad_gx is not None:
                outputs.append(gx)
                grad_outputs.append(grad_gx)
            if grad_value is not None:
                surrogate = x_.new_zeros(x_.shape[0])
                for w, v in zip(ws, vs, strict=True):
                    if ctx.jacobian is not None:  # w^T (J v): a tangent pass, so one first-order backward
                        surrogate = surrogate + _flat_dot(w, ctx.jacobian.jvp(v))
                    else:  # (w^T J) v: a vector-Jacobian product with its graph, so a double backward
                        (wj,) = torch.autograd.grad(gx, x_, w, create_graph=True, retain_graph=True)
                        surrogate = surrogate + _flat_dot(wj, v)
                outputs.append(surrogate / ctx.n_probes)
                grad_outputs.append(grad_value)
            if not outputs:
                return (None,) * (3 + ctx.n_params)
            grads = torch.autograd.grad(outputs, [x_, *params], grad_outputs, allow_unused=True, retain_graph=True)
        return (None, None, grads[0] if ctx.needs_input_grad[2] else None, *grads[1:])


ESTIMATORS: dict[str, type[LogDetEstimator]] = {
    "exact": ExactLogDet,
    "power_series": PowerSeriesLogDet,
    "russian_roulette": RussianRouletteLogDet,
}


def make_estimator(name: str, **kwargs) -> LogDetEstimator:
    """Build an estimator by name, e.g. ``make_estimator("russian_roulette", n_exact_terms=2, gradient="neumann")``."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown log-det estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    return cls(**kwargs)
