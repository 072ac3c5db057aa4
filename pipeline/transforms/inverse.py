"""Inverting ``y = x + g(x)`` by fixed-point iteration (Algorithm 1 of the paper).

``x^0 = y, x^{k+1} = y - g(x^k)`` converges exponentially when ``Lip(g) < 1`` (Banach). Each
sample stops on its own *residual* ``||x + g(x) - y||`` measured against ``atol + rtol * ||y||``
(the residual of ``x^k`` is exactly ``||x^k - x^{k+1}||``, so checking it costs nothing extra),
and the returned point is the one whose residual was measured. Samples that have not converged
after ``max_iterations`` are reported, never silently returned as if exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class InverseDidNotConverge(RuntimeError):
    """Raised by a strict inversion when some samples miss the tolerance."""


@dataclass(frozen=True)
class FixedPointConfig:
    """Stopping rule for the fixed-point inverse."""

    atol: float = 1e-6
    rtol: float = 1e-6
    max_iterations: int = 100
    strict: bool = False  # raise instead of warning when a sample does not converge
    warn: bool = True  # log non-convergence (off for deliberate fixed-iteration studies)

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or (self.atol == 0 and self.rtol == 0):
            raise ValueError(f"need atol >= 0, rtol >= 0 and not both zero, got atol={self.atol}, rtol={self.rtol}")
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(f"max_iterations must be an integer >= 1, got {self.max_iterations!r}")


@dataclass
class FixedPointResult:
    x: Tensor  # the reconstruction
    iterations: Tensor  # per sample: evaluations of g until the residual met the tolerance
    residual: Tensor  # per sample: ||x + g(x) - y|| at the returned x
    converged: Tensor  # per sample, bool


def _flat_norm(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).norm(dim=1)


@torch.no_grad()
def fixed_point_inverse(
    g: Callable[[Tensor], Tensor], y: Tensor, config: FixedPointConfig = FixedPointConfig()
) -> FixedPointResult:
    """Solve ``x + g(x) = y`` per sample. ``g`` must act on each sample independently."""
    batch = y.shape[0]
    tol = config.atol + config.rtol * _flat_norm(y)
    x = y.clone()
    residual = torch.full((batch,), float("inf"), dtype=y.dtype, device=y.device)
    iterations = torch.zeros(batch, dtype=torch.long, device=y.device)
    active = torch.ones(batch, dtype=torch.bool, device=y.device)
    for _ in range(config.max_iterations):
        idx = active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        x_act, y_act = x[idx], y[idx]
        x_next = y_act - g(x_act)
        res = _flat_norm(x_next - x_act)  # = ||x_act + g(x_act) - y_act||
        residual[idx] = res
        iterations[idx] += 1
        done = res <= tol[idx]
        # converged samples keep the iterate whose residual was measured; the others step on
        x[idx] = torch.where(done.reshape(-1, *[1] * (y.dim() - 1)), x_act, x_next)
        active[idx[done]] = False
    if active.any():
        # the last step moved the unconverged samples past their measured residual: measure again
        idx = active.nonzero(as_tuple=True)[0]
        residual[idx] = _flat_norm(x[idx] + g(x[idx]) - y[idx])
        iterations[idx] += 1
        active[idx[residual[idx] <= tol[idx]]] = False
    converged = ~active
    if not bool(converged.all()):
        n_bad = int((~converged).sum())
        msg = (
            f"fixed-point inverse: {n_bad}/{batch} samples did not reach atol={config.atol}, rtol={config.rtol} "
            f"in {config.max_iterations} iterations (largest residual {float(residual.max()):.3e}); "
            "is Lip(g) < 1?"
        )
        if config.strict:
            raise InverseDidNotConverge(msg)
        if config.warn:
            log.warning(msg)
    return FixedPointResult(x=x, iterations=iterations, residual=residual, converged=converged)
