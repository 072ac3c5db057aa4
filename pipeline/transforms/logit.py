"""The logit transform of image data (Dinh et al. 2017, Real NVP; Residual Flows' first layer).

Dequantised pixels live in a bounded box, where a flow's Gaussian prior puts mass on values no image has; MNIST's
pixels also pile up at both ends of it. Mapping the box onto the whole real line first lets the flow model an
unbounded density and keeps every sample inside the box.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.transforms.base import InverseReport, Transform


class LogitTransform(Transform):
    """``y = logit(alpha + (1 - 2 alpha) (x - low))`` elementwise, for data ``x`` in ``[low, low + 1)``.

    ``alpha`` keeps the ends of the box finite (Residual Flows: 1e-6 on MNIST, 0.05 on CIFAR-10). The
    log-determinant is exact: ``sum(log(1 - 2 alpha) - log(s) - log(1 - s))`` with ``s`` the squashed value. The
    default ``low = -1/2`` is the pipeline's dequantised range (:func:`pipeline.data.dequantize`).
    """

    def __init__(self, alpha: float = 1e-6, low: float = -0.5) -> None:
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"the logit transform's alpha must be in (0, 1/2), got {alpha}")
        self.alpha, self.low = float(alpha), float(low)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # outside the box the logit is NaN, and so is the loss: the training loop's non-finite check stops the run.
        # The data is validated once where it is loaded (pipeline.data.ImageDataset), never here: a device-side
        # assert would lose its message on a GPU and leave the CUDA context unusable (no checkpoint, no model)
        u = x - self.low
        s = self.alpha + (1 - 2 * self.alpha) * u
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        # d logit(s) / dx = (1 - 2 alpha) / (s (1 - s))
        logdet = (math.log1p(-2 * self.alpha) - log_s - log_1ms).flatten(1).sum(dim=1)
        return log_s - log_1ms, logdet

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha) + self.low

    def inverse_and_logdet(self, y: Tensor, *, report: InverseReport | None = None) -> tuple[Tensor, Tensor]:
        x = self.inverse(y)
        # -log|dy/dx| from y directly: log s + log(1 - s) = -softplus(-y) - softplus(y)
        logdet = (-F.softplus(-y) - F.softplus(y) - math.log1p(-2 * self.alpha)).flatten(1).sum(dim=1)
        return x, logdet

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, low={self.low:g}"
