"""ActNorm (Kingma & Dhariwal 2018): per-channel affine map with data-dependent initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.transforms.base import InverseReport, Transform


class ActNorm(Transform):
    """``y = (x + bias) * exp(log_scale)`` per channel (dim 1), for ``(B, C)`` or ``(B, C, H, W)``.

    On the first forward, bias and scale are set so that the batch has zero mean and unit variance
    per channel; a channel that is constant in the batch (e.g. injective zero padding) keeps scale 1,
    since 1/std would blow it up. The log-determinant is exact: ``(H * W) * sum(log_scale)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, min_std: float = 1e-3) -> None:
        super().__init__()
        self.num_features, self.eps, self.min_std = num_features, eps, min_std
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.initialized: Tensor
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # mirrors the `initialized` buffer once seen True: reading it costs a host sync on GPUs

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._ready = False  # re-read the loaded `initialized` flag on the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.reshape(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        # a bad first batch would set bias and scale to NaN for good: refuse it instead
        if x.shape[0] == 0:
            raise ValueError("ActNorm's data-dependent initialisation needs a non-empty first batch")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                "ActNorm's data-dependent initialisation got a batch with NaN or inf values; "
                "it would make every later output NaN. Check the data (or the layers before this one)"
            )
        channels_last = x.transpose(0, 1).reshape(self.num_features, -1)
        self.bias.copy_(-channels_last.mean(dim=1))
        std = channels_last.std(dim=1)
        self.log_scale.copy_(torch.where(std > self.min_std, -torch.log(std + self.eps), torch.zeros_like(std)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] != self.num_features:
            raise ValueError(f"ActNorm expects {self.num_features} channels, got input of shape {tuple(x.shape)}")
        if not self._ready:
            if not bool(self.initialized):
                self._initialize(x)
            self._ready = True
        y = (x + self._view(self.bias, x)) * self._view(self.log_scale, x).exp()
        spatial = math.prod(x.shape[2:])
        logdet = (spatial * self.log_scale.sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        if not bool(self.initialized):
            raise RuntimeError("ActNorm is not initialised: run a forward pass on data before inverting")
        return y * self._view(-self.log_scale, y).exp() - self._view(self.bias, y)

    def extra_repr(self) -> str:
        return str(self.num_features)
