"""1-Lipschitz nonlinearities for residual branches.

Every activation here has Lipschitz constant at most one, so it does not loosen the bound
``Lip(g) <= prod ||W_i||``. ELU and softplus are smooth, which matters for density estimation
because the gradient of the log-determinant needs the second derivative of the nonlinearity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaxMin(nn.Module):
    """The "sorting" activation (Anil et al. 2019): sort pairs of channels, ``(a, b) -> (max, min)``.

    A permutation of its input, so it is 1-Lipschitz and gradient-norm preserving. Needs an
    even number of channels along ``dim``.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[self.dim] % 2:
            raise ValueError(f"MaxMin needs an even size along dim {self.dim}, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with learnable ``beta > 0`` (Chen et al. 2019, Residual Flows).

    ``sup |d/dx x sigmoid(beta x)| <= 1.1`` for every beta, hence the division.
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta_raw = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.beta_raw)
        return x * torch.sigmoid(beta * x) / 1.1


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "sort": MaxMin,
    "lipswish": LipSwish,
}


def make_activation(name: str) -> nn.Module:
    """Build a 1-Lipschitz activation by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
