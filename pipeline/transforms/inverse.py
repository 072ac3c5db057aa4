"""Inverting ``y = x + g(x)``: the fixed point of Algorithm 1, plain or Anderson-accelerated, with implicit gradients.

Both methods share one stopping rule: each sample stops on its own *residual*
``||x + g(x) - y||`` measured against ``atol + rtol * ||y||`` (the residual of ``x`` is exactly
``||T(x) - x||`` with ``T(x) = y - g(x)``, so checking it costs nothing extra), the returned point is
one whose residual was measured, and samples that miss the tolerance in ``max_iterations``
evaluations of ``g`` are reported, never silently returned as if exact.

* ``"plain"``: ``x^0 = y, x^{k+1} = y - g(x^k)``, converging exponentially when ``Lip(g) < 1``
  (Banach). With ``max_iterations = k`` it returns ``x^k``, as in the paper (unless it stalls first).
* ``"anderson"``: Anderson acceleration (type II, Walker & Ni 2011). The next iterate mixes the
  last ``anderson_memory`` images ``T(x^j)`` with the weights that minimise the mixed residual,
  still one evaluation of ``g`` per iteration. Anderson is not monotone; a sample whose best residual
  has not improved for ``stall_iterations`` iterations (or whose mixed iterate is not finite) falls
  back to the plain iteration from its best point, which converges whenever ``Lip(g) < 1``. Returns
  the iterate with the smallest measured residual.

Precision (:mod:`pipeline.precision`): the solve runs in full precision (autocast and TF32 off), its
relative tolerance is floored at what the dtype can resolve (``8 eps``: 1e-6 stays 1e-6 in float32, bf16
gets 6e-2), and a sample whose residual has not reached a new low for ``stall_iterations`` iterations
stops there, reported as *stalled*: in exact arithmetic the plain iteration's residual falls every
iteration when ``Lip(g) < 1``, so a stall means a precision floor inside ``g`` (bf16 or TF32 arithmetic
the solve cannot switch off) or ``Lip(g) >= 1``, and iterating on would only spend time.

Gradients: when autograd is on and ``y`` or the parameters of ``g`` need gradients, the solution
carries the *implicit* gradient ``dx/dy = (I + J_g(x))^{-1}``, ``dx/dθ = -(I + J_g(x))^{-1} dg/dθ``.
Backward solves ``u = v - J_g(x)^T u`` by the same method (a contraction too), to ``backward_rtol``
relative to the incoming gradient; no graph is kept through the iterations, only one evaluation of
``g`` at the solution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.precision import full_precision, relative_precision_floor

log = logging.getLogger(__name__)

INVERSE_METHODS = ("plain", "anderson")


class InverseDidNotConverge(RuntimeError):
    """Raised by a strict inversion when some samples miss the tolerance."""


@dataclass(frozen=True)
class FixedPointConfig:
    """Stopping rule and method of the inverse (and of its implicit backward)."""

    atol: float = 1e-6
    rtol: float = 1e-6
    max_iterations: int = 100  # evaluations of g per sample
    strict: bool = False  # raise instead of warning when a sample does not converge
    warn: bool = True  # log non-convergence (off for deliberate fixed-iteration studies)
    method: str = "plain"  # or "anderson"
    anderson_memory: int = 5  # past iterates mixed
    anderson_damping: float = 1.0  # beta: 1 mixes images only
    anderson_regularization: float = 1e-10  # Tikhonov, relative to the largest squared residual
    stall_iterations: int = 10  # steps without a new best residual: Anderson falls back to plain, plain stops
    backward_rtol: float = 1e-6  # implicit gradient: residual relative to the incoming gradient

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0 or (self.atol == 0 and self.rtol == 0):
            raise ValueError(f"need atol >= 0, rtol >= 0 and not both zero, got atol={self.atol}, rtol={self.rtol}")
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(f"max_iterations must be an integer >= 1, got {self.max_iterations!r}")
        if self.method not in INVERSE_METHODS:
            raise ValueError(f"unknown inverse method {self.method!r}; choose one of {INVERSE_METHODS}")
        if not isinstance(self.anderson_memory, int) or self.anderson_memory < 1:
            raise ValueError(f"anderson_memory must be an integer >= 1, got {self.anderson_memory!r}")
        if not 0 < self.anderson_damping <= 1:
            raise ValueError(f"anderson_damping must be in (0, 1], got {self.anderson_damping}")
        if self.anderson_regularization < 0 or self.stall_iterations < 1 or not self.backward_rtol > 0:
            raise ValueError("need anderson_regularization >= 0, stall_iterations >= 1 and backward_rtol > 0")


@dataclass
class FixedPointResult:
    x: Tensor  # the solution
    iterations: Tensor  # per sample: evaluations of g until the residual met the tolerance
    residual: Tensor  # per sample: ||x + g(x) - y|| at the returned x
    converged: Tensor  # per sample, bool
    fell_back: Tensor  # per sample, bool: Anderson stalled and the plain iteration finished the job
    stalled: Tensor  # per sample, bool: stopped unconverged because the residual no longer fell (a precision floor)


def _flat_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)  # reshape(B, -1) is ambiguous for an empty batch


def _within(residual: Tensor, tol: Tensor) -> Tensor:
    """Converged: a finite residual within a finite tolerance (an overflowing ||y|| makes tol inf)."""
    return torch.isfinite(residual) & torch.isfinite(tol) & (residual <= tol)


def _anderson_mix(xs: Tensor, fs: Tensor, config: FixedPointConfig) -> Tensor:
    """Mix the history ``xs``/``fs = T(xs)`` of shape ``(b, n, d)``: ``sum_j a_j (beta f_j + (1-beta) x_j)``.

    ``a`` minimises ``||sum_j a_j (f_j - x_j)||`` subject to ``sum_j a_j = 1``: ``a = H^{-1} 1 / 1^T H^{-1} 1``
    with ``H`` the (regularised) Gram matrix of the residuals, solved in float64 (it is n x n).
    """
    residuals = fs - xs
    gram = (residuals @ residuals.transpose(1, 2)).double()  # n x n: the solve is cheap in float64
    n = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    gram = gram + (config.anderson_regularization * scale)[:, None, None] * eye
    z, _ = torch.linalg.solve_ex(gram, torch.ones(gram.shape[0], n, 1, dtype=gram.dtype, device=gram.device))
    alpha = (z / z.sum(dim=1, keepdim=True)).transpose(1, 2).to(xs.dtype)  # (b, 1, n); NaN if singular
    beta = config.anderson_damping
    mixed = alpha @ fs if beta == 1.0 else beta * (alpha @ fs) + (1 - beta) * (alpha @ xs)
    return mixed[:, 0]


@torch.no_grad()
def solve_fixed_point(
    step: Callable[[Tensor, Tensor | slice], Tensor], x0: Tensor, tol: Tensor, config: FixedPointConfig
) -> FixedPointResult:
    """Solve ``x = T(x)`` per sample, with ``step(x_active, idx) = T(x)`` for the samples ``idx`` of the batch.

    ``idx`` indexes the batch dimension: an index tensor, or ``slice(None)`` while every sample is active.

    ``tol`` is the per-sample tolerance on the residual ``||T(x) - x||``. Converged samples drop out of
    the batch, so ``step`` is only evaluated on the ones still iterating.
    """
    batch, anderson, stall = x0.shape[0], config.method == "anderson", config.stall_iterations
    x = x0.clone()
    residual = torch.full((batch,), float("inf"), dtype=x0.dtype, device=x0.device)
    best = residual.clone()  # the lowest residual measured so far
    since_best = torch.zeros(batch, dtype=torch.long, device=x0.device)
    iterations = torch.zeros(batch, dtype=torch.long, device=x0.device)
    active = torch.ones(batch, dtype=torch.bool, device=x0.device)
    fell_back = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    stalled = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    if anderson:
        m, d = config.anderson_memory, math.prod(x0.shape[1:])
        xs, fs = x0.new_zeros(batch, m, d), x0.new_zeros(batch, m, d)
        best_x, best_f = x0.clone(), x0.clone()

    def column(mask: Tensor) -> Tensor:
        return mask.reshape(-1, *[1] * (x0.dim() - 1))

    everyone = torch.arange(batch, device=x0.device)
    for it in range(config.max_iterations):
        # while no sample has stopped, index with a slice (views, no gathers): the common case
        idx = everyone if bool(active.all()) else active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        sel = slice(None) if idx is everyone else idx
        x_act = x[sel]
        f_act = step(x_act, sel)
        res = _flat_norm(f_act - x_act)
        iterations[sel] += 1
        done = _within(res, tol[sel])
        improved = res < best[sel]
        best[sel] = torch.where(improved, res, best[sel])
        since_best[sel] = torch.where(improved, 0, since_best[sel] + 1)
        if anderson:
            residual[sel] = best[sel]
            best_x[sel] = torch.where(column(improved), x_act, best_x[sel])
            best_f[sel] = torch.where(column(improved), f_act, best_f[sel])
            slot, n = it % m, min(it + 1, m)
            xs[sel, slot], fs[sel, slot] = x_act.flatten(1), f_act.flatten(1)
            mixed = _anderson_mix(xs[sel, :n], fs[sel, :n], config).reshape(x_act.shape)
            # the plain iteration stalling after the fallback is a precision floor; Anderson stalling is not
            floored = fell_back[sel] & (since_best[sel] >= stall)
            newly = ~fell_back[sel] & ((since_best[sel] >= stall) | ~torch.isfinite(mixed.flatten(1)).all(dim=1))
            fell_back[sel] |= newly
            since_best[sel] = torch.where(newly, 0, since_best[sel])  # the plain iteration gets its own patience
            proposal = torch.where(column(fell_back[sel]), f_act, mixed)
            # a sample that has just stalled restarts the plain iteration from its best point
            proposal = torch.where(column(newly), best_f[sel], proposal)
        else:
            residual[sel] = res
            floored = since_best[sel] >= stall
            proposal = f_act
        stop = done | floored
        stalled[sel] |= floored & ~done
        # stopped samples keep the iterate whose residual was measured; the others step on
        x[sel] = torch.where(column(stop), x_act, proposal)
        active[idx[stop]] = False
    if active.any():  # out of iterations: measure the last proposal too
        idx = active.nonzero(as_tuple=True)[0]
        res = _flat_norm(step(x[idx], idx) - x[idx])
        iterations[idx] += 1
        if anderson:
            improved = res < residual[idx]
            residual[idx] = torch.where(improved, res, residual[idx])
            best_x[idx] = torch.where(column(improved), x[idx], best_x[idx])
        else:
            residual[idx] = res
    if anderson:
        x = best_x
    converged = _within(residual, tol)
    return FixedPointResult(
        x=x,
        iterations=iterations,
        residual=residual,
        converged=converged,
        fell_back=fell_back,
        stalled=stalled & ~converged,
    )


def _check_convergence(result: FixedPointResult, config: FixedPointConfig, what: str, tolerance: str) -> None:
    if bool(result.converged.all()):
        return
    n_bad, batch = int((~result.converged).sum()), result.converged.numel()
    n_stalled = int(result.stalled.sum())
    msg = (
        f"{what}: {n_bad}/{batch} samples did not reach {tolerance} ({config.method}; largest residual "
        f"{float(result.residual.max()):.3e}); "
    )
    if n_stalled:
        msg += (
            f"{n_stalled} stopped because their residual had not fallen for {config.stall_iterations} iterations: "
            "either the branch computes in lower precision than the tolerance (bf16, or TF32 that the solve could "
            "not switch off), then loosen the tolerance, or Lip(g) >= 1"
        )
    else:
        msg += f"the others ran out of {config.max_iterations} iterations; is Lip(g) < 1?"
    if config.strict:
        raise InverseDidNotConverge(msg)
    if config.warn:
        log.warning(msg)


def _relative_tolerance(rtol: float, like: Tensor) -> float:
    """``rtol``, raised to what a solve in ``like``'s dtype can resolve (a no-op for float32's default 1e-6)."""
    return max(rtol, relative_precision_floor(like.dtype))


def _needs_gradient(g: Callable[[Tensor], Tensor], y: Tensor) -> bool:
    return y.requires_grad or (isinstance(g, nn.Module) and any(p.requires_grad for p in g.parameters()))


def _attach_implicit_gradient(g: Callable[[Tensor], Tensor], y: Tensor, x: Tensor, config: FixedPointConfig) -> Tensor:
    """``x`` (the solution) as a function of ``y`` and θ through the implicit function theorem."""
    z = x.detach().requires_grad_(True)
    with full_precision(y.device.type):  # its backward (the adjoint's products) keeps the forward's precision
        gz = g(z)  # the one evaluation with a graph: J_g(x)^T products for the adjoint, and dg/dθ
    step_out = y - gz  # d/dy = I, d/dθ = -dg/dθ; the hook turns its incoming v into (I + J)^{-T} v

    def adjoint(v: Tensor) -> Tensor:
        def step(u: Tensor, idx: Tensor | slice) -> Tensor:
            full = torch.zeros_like(v)
            full[idx] = u
            (jtu,) = torch.autograd.grad(gz, z, full, retain_graph=True)
            return v[idx] - jtu[idx]

        tol = _relative_tolerance(config.backward_rtol, v) * _flat_norm(v)
        with full_precision(v.device.type):
            result = solve_fixed_point(step, v, tol, config)
        _check_convergence(result, config, "implicit gradient of the inverse", f"rtol={config.backward_rtol}")
        return result.x

    step_out.register_hook(adjoint)
    return x.detach() + (step_out - step_out.detach())  # the value stays exactly the solution


def fixed_point_inverse(
    g: Callable[[Tensor], Tensor], y: Tensor, config: FixedPointConfig = FixedPointConfig()
) -> FixedPointResult:
    """Solve ``x + g(x) = y`` per sample (``g`` must act on each sample independently), in full precision."""
    with torch.no_grad(), full_precision(y.device.type):
        tol = config.atol + _relative_tolerance(config.rtol, y) * _flat_norm(y)
        result = solve_fixed_point(lambda x, idx: y[idx] - g(x), y, tol, config)
    _check_convergence(result, config, "fixed-point inverse", f"atol={config.atol}, rtol={config.rtol}")
    if torch.is_grad_enabled() and _needs_gradient(g, y):
        result.x = _attach_implicit_gradient(g, y, result.x, config)
    return result
