"""Base distributions for flows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian(nn.Module):
    """``N(mean, diag(exp(log_std))^2)`` over tensors of ``shape`` (per sample).

    ``learnable=False`` gives a fixed standard normal.
    """

    def __init__(self, shape: Sequence[int], *, learnable: bool = True) -> None:
        super().__init__()
        self.shape = tuple(shape)
        mean, log_std = torch.zeros(self.shape), torch.zeros(self.shape)
        if learnable:
            self.mean, self.log_std = nn.Parameter(mean), nn.Parameter(log_std)
        else:
            self.register_buffer("mean", mean)
            self.register_buffer("log_std", log_std)

    def log_prob(self, z: Tensor) -> Tensor:
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"expected samples of shape (B, {', '.join(map(str, self.shape))}), got {tuple(z.shape)}")
        normalized = (z - self.mean) * torch.exp(-self.log_std)
        per_dim = -0.5 * (normalized**2 + _LOG_2PI) - self.log_std
        return per_dim.flatten(1).sum(dim=1)

    def sample(self, n: int, *, temperature: float = 1.0) -> Tensor:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of samples must be an integer >= 0, got {n!r}")
        eps = torch.randn(n, *self.shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + temperature * torch.exp(self.log_std) * eps
