"""Brute-force references shared by the transform and model tests."""

import torch
from torch.autograd.functional import jacobian


def dense_jacobians(fn, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian of ``fn`` (applied to one sample at a time), shape (B, d_out, d_in)."""
    out = []
    for xi in x:
        jac = jacobian(lambda v: fn(v.reshape(1, *x.shape[1:])).reshape(-1), xi.reshape(-1))
        out.append(jac)
    return torch.stack(out)


def power_series_from_dense(jac: torch.Tensor, n_terms: int) -> torch.Tensor:
    """The truncated series sum_{k<=n} (-1)^{k+1} tr(J^k)/k computed exactly from dense J."""
    total = torch.zeros(jac.shape[0], dtype=jac.dtype)
    power = torch.eye(jac.shape[-1], dtype=jac.dtype).expand_as(jac)
    for k in range(1, n_terms + 1):
        power = power @ jac
        total = total + (-1) ** (k + 1) / k * power.diagonal(dim1=-2, dim2=-1).sum(-1)
    return total
