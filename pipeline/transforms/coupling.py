"""Glow's building blocks: invertible linear maps (LU) and affine couplings.

The vector ones are the Glow baseline the paper compares with on the 2-D toy densities (Fig. 2);
:class:`SplitPriorCoupling` is Glow's learned prior at a multi-scale flow's split, for the image flows.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.transforms.base import InverseReport, Transform


class InvertibleLinear(Transform):
    """``y = W x`` over dim 1 with ``W = P L (U + diag(s))`` (Kingma & Dhariwal 2018): exact, cheap log-det.

    For ``(B, C)`` vectors, or ``(B, C, H, W)`` maps where it is Glow's invertible 1x1 convolution (the same ``W`` at
    every pixel, log-det ``H * W * sum(log|s|)``). ``P`` is fixed; ``W`` starts as a random rotation.
    """

    permutation: Tensor
    sign: Tensor
    eye: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        p, lower, upper = torch.linalg.lu(q)
        self.register_buffer("permutation", p)
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        diag = upper.diagonal()
        self.register_buffer("sign", torch.sign(diag))
        self.log_abs_diag = nn.Parameter(diag.abs().log())
        self.register_buffer("eye", torch.eye(dim))

    def weight(self) -> Tensor:
        lower = self.lower.tril(-1) + self.eye
        upper = self.upper.triu(1) + torch.diag(self.sign * self.log_abs_diag.exp())
        return self.permutation @ lower @ upper

    def _check(self, x: Tensor) -> None:
        if x.dim() not in (2, 4) or x.shape[1] != self.dim:
            raise ValueError(
                f"InvertibleLinear({self.dim}) expects (B, {self.dim}) or (B, {self.dim}, H, W), got {tuple(x.shape)}"
            )

    @staticmethod
    def _mix(matrix: Tensor, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x @ matrix.t()
        return F.conv2d(x, matrix[:, :, None, None])  # the same map at every pixel

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        spatial = math.prod(x.shape[2:])
        return self._mix(self.weight(), x), (spatial * self.log_abs_diag.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        self._check(y)
        if y.dim() == 2:
            return torch.linalg.solve(self.weight(), y.t()).t()
        return self._mix(torch.linalg.inv(self.weight()), y)

    def extra_repr(self) -> str:
        return str(self.dim)


class AffineCoupling(Transform):
    """``y_b = x_b * exp(s(x_a)) + t(x_a)``, ``y_a = x_a``; ``s`` bounded by ``tanh`` for stability."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64), *, swap: bool = False) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError("an affine coupling needs at least 2 dimensions")
        self.split, self.swap = dim // 2, swap
        n_cond, n_out = (dim - self.split, self.split) if swap else (self.split, dim - self.split)
        widths = [n_cond, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ELU()]
        last = nn.Linear(widths[-1], 2 * n_out)
        nn.init.zeros_(last.weight)  # start at the identity
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.split], x[:, self.split :]
        return (b, a) if self.swap else (a, b)

    def _join(self, cond: Tensor, other: Tensor) -> Tensor:
        return torch.cat([other, cond] if self.swap else [cond, other], dim=1)

    def _scale_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        log_scale, shift = self.net(cond).chunk(2, dim=1)
        return torch.tanh(log_scale), shift

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cond, other = self._halves(x)
        log_scale, shift = self._scale_shift(cond)
        return self._join(cond, other * log_scale.exp() + shift), log_scale.sum(dim=1)

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        cond, other = self._halves(y)
        log_scale, shift = self._scale_shift(cond)
        return self._join(cond, (other - shift) * torch.exp(-log_scale))


class SplitPriorCoupling(Transform):
    """Glow's learned prior for a factored-out half, as a transform: ``z' = (z - mu(h)) * exp(-s(h))``.

    On ``(B, C, H, W)``: ``z`` is the first half of the channels (the half a multi-scale flow factors out), ``h`` the
    second (the half that goes on to the next level). ``mu`` and ``s`` come from one ``kernel_size`` convolution of
    ``h``, zero-initialised (Glow's ``Conv2dZeros``), so the layer starts as the identity and the factored-out
    latent's density becomes conditional on the coarser levels: without it, sampling draws that half as noise
    independent of the image the other levels describe. ``s`` is bounded by ``tanh``; the log-det is exact.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"a split needs an even number of channels >= 2, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.channels = channels
        self.net = nn.Conv2d(channels // 2, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(cast(Tensor, self.net.bias))  # the convolution is built with a bias

    def _shift_log_scale(self, h: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.net(h).chunk(2, dim=1)
        return shift, torch.tanh(log_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SplitPriorCoupling expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        z, h = x.chunk(2, dim=1)
        shift, log_scale = self._shift_log_scale(h)
        return torch.cat([(z - shift) * torch.exp(-log_scale), h], dim=1), -log_scale.flatten(1).sum(dim=1)

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        z, h = y.chunk(2, dim=1)
        shift, log_scale = self._shift_log_scale(h)
        return torch.cat([z * torch.exp(log_scale) + shift, h], dim=1)

    def extra_repr(self) -> str:
        return str(self.channels)
