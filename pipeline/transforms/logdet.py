"""Estimators of ``log det(I + J_g(x))`` for a residual branch ``g`` (Algorithm 2 of the paper).

Each estimator is a callable ``estimator(g, x) -> (g(x), logdet)`` returning the branch output
(so the block needs a single forward of ``g``) and a per-sample log-determinant. When autograd is
enabled the result is differentiable (for training); under ``torch.no_grad()`` the estimate is
computed with a local graph that is freed straight after, and returned detached.

New estimators (for example an unbiased Russian-roulette series) subclass :class:`LogDetEstimator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Branch = Callable[[Tensor], Tensor]

PROBES = ("gaussian", "rademacher")


def sample_probe(like: Tensor, kind: str) -> Tensor:
    """Hutchinson probe with ``E[v] = 0`` and ``Cov(v) = I``."""
    if kind == "gaussian":
        return torch.randn_like(like)
    if kind == "rademacher":
        return torch.randint_like(like, low=0, high=2).mul_(2).sub_(1)
    raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(dim=1)


class LogDetEstimator:
    """Base class: ``__call__(g, x) -> (g(x), log det(I + J_g(x)))`` per sample."""

    name = "base"

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

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
    """Brute force: the full Jacobian by batched vector-Jacobian products, then ``slogdet``.

    Costs ``d`` backward passes (batched with vmap) and ``O(B d^2)`` memory, so it is limited to
    ``max_dim`` dimensions per sample; use it for low-dimensional data and for testing.
    """

    max_dim: int = 1024
    name = "exact"

    def __post_init__(self) -> None:
        if self.max_dim < 1:
            raise ValueError(f"max_dim must be >= 1, got {self.max_dim}")

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        gx = g(x)
        batch, d = x.shape[0], x[0].numel()
        if d > self.max_dim:
            raise ValueError(
                f"exact log-determinant needs the full {d}x{d} Jacobian per sample, above max_dim={self.max_dim}; "
                "use the 'power_series' estimator for this dimension (or raise max_dim if memory allows)"
            )
        basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, 1, *x.shape[1:])
        basis = basis.expand(d, batch, *x.shape[1:])
        # rows[i, b] = e_i^T J_g(x_b)
        (rows,) = torch.autograd.grad(gx, x, basis, is_grads_batched=True, create_graph=differentiable)
        jac = rows.reshape(d, batch, d).transpose(0, 1)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return gx, torch.linalg.slogdet(eye + jac).logabsdet


@dataclass(frozen=True)
class PowerSeriesLogDet(LogDetEstimator):
    """Truncated power series ``sum_{k=1}^{n} (-1)^{k+1} tr(J^k) / k`` with Hutchinson traces.

    ``v^T J^k v`` is computed by ``k`` vector-Jacobian products, never forming ``J``. Biased by the
    truncation (bounded by Theorem 3, see :mod:`pipeline.bounds`); unbiased in the trace.
    """

    n_terms: int = 5
    n_probes: int = 1
    probe: str = "gaussian"
    name = "power_series"

    def __post_init__(self) -> None:
        if not isinstance(self.n_terms, int) or self.n_terms < 1:
            raise ValueError(f"n_terms must be an integer >= 1, got {self.n_terms!r}")
        if not isinstance(self.n_probes, int) or self.n_probes < 1:
            raise ValueError(f"n_probes must be an integer >= 1, got {self.n_probes!r}")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; choose one of {PROBES}")

    def estimate(self, g: Branch, x: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        gx = g(x)
        logdet = x.new_zeros(x.shape[0])
        for _ in range(self.n_probes):
            v = sample_probe(x, self.probe)
            w = v
            for k in range(1, self.n_terms + 1):
                (w,) = torch.autograd.grad(gx, x, w, create_graph=differentiable, retain_graph=True)
                logdet = logdet + ((-1) ** (k + 1) / k) * _flat_dot(w, v)
        return gx, logdet / self.n_probes


ESTIMATORS: dict[str, type[LogDetEstimator]] = {"exact": ExactLogDet, "power_series": PowerSeriesLogDet}


def make_estimator(name: str, **kwargs) -> LogDetEstimator:  # noqa: ANN003
    """Build an estimator by name, e.g. ``make_estimator("power_series", n_terms=10)``."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown log-det estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    return cls(**kwargs)
