"""The bijection interface shared by every flow layer (after ``nflows``/``zuko``).

``forward(x) -> (y, logabsdet)`` maps data towards the latent space and returns the per-sample
log-determinant of the Jacobian; ``inverse(y) -> x`` maps back. A transform's signature is its inputs
only: a residual block's log-det estimator is its own setting (chosen per model, or for a while with
:func:`pipeline.transforms.residual.using_estimator`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from pipeline.layers.spectral import batched_power_iteration


@dataclass
class InverseReport:
    """Statistics of the iterative inversions performed during one ``inverse`` call.

    One entry per residual block that was inverted, in the order they were inverted.
    """

    iterations: list[int] = field(default_factory=list)  # most iterations any sample needed
    max_residual: list[float] = field(default_factory=list)  # largest final ||x + g(x) - y||
    n_not_converged: list[int] = field(default_factory=list)
    n_fallback: list[int] = field(default_factory=list)  # samples where Anderson stalled and plain finished

    @property
    def converged(self) -> bool:
        return not any(self.n_not_converged) and not self._nan_residual

    @property
    def _nan_residual(self) -> bool:
        return any(math.isnan(r) for r in self.max_residual)

    @property
    def total_iterations(self) -> int:
        return sum(self.iterations)

    def summary(self) -> dict[str, float]:
        return {
            "inverse_blocks": float(len(self.iterations)),
            "inverse_max_iterations": float(max(self.iterations, default=0)),
            "inverse_total_iterations": float(self.total_iterations),
            # max() skips a NaN that is not first: a NaN residual must show
            "inverse_max_residual": float("nan") if self._nan_residual else max(self.max_residual, default=0.0),
            "inverse_not_converged": float(sum(self.n_not_converged)),
            "inverse_fallbacks": float(sum(self.n_fallback)),
        }


class Transform(nn.Module):
    """A bijection with a log-determinant."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        raise NotImplementedError

    def map(self, x: Tensor) -> Tensor:
        """The bijection alone, without its log-determinant (cheaper where that costs extra)."""
        return self.forward(x)[0]

    def inverse_and_logdet(self, y: Tensor, *, report: InverseReport | None = None) -> tuple[Tensor, Tensor]:
        """``x = f^{-1}(y)`` and ``log|det J_{f^{-1}}(y)| = -log|det J_f(x)|``, evaluated at the reconstructed x."""
        x = self.inverse(y, report=report)
        _, logdet = self.forward(x)
        return x, -logdet


class TransformSequence(Transform):
    """Composition ``f_n o ... o f_1``; log-determinants add up."""

    def __init__(self, *transforms: Transform) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.steps)

    @property
    def steps(self) -> Sequence[Transform]:
        """The transforms in order (the ``ModuleList`` that registers them, typed as what it holds)."""
        return cast("Sequence[Transform]", self.transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:  # every spectral layer's power iteration for this step, stacked by shape
            batched_power_iteration(self)
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, logdet = t(x)
            total = total + logdet
        return x, total

    def map(self, x: Tensor) -> Tensor:
        if self.training:
            batched_power_iteration(self)
        for t in self.steps:
            x = t.map(x)
        return x

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        for t in reversed(self.steps):
            y = t.inverse(y, report=report)
        return y


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)  # reshape(B, -1) is ambiguous for an empty batch


def zeros_logdet(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
