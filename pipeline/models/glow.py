"""Glow for vectors: the baseline of the paper's toy experiment (Fig. 2).

Each step is ActNorm -> invertible linear map (LU) -> affine coupling, all with exact log-dets.
:func:`matched_glow` sizes the coupling networks so the baseline has the depth and (about) the
parameter count of a given i-ResNet vector flow.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.models.base import FlowModel, in_model_dtype, make_prior, n_parameters
from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.coupling import AffineCoupling, InvertibleLinear


@dataclass(frozen=True)
class GlowArchitecture:
    """Architecture of :class:`GlowFlow`: ``n_steps`` of ActNorm, an LU linear map and an affine coupling."""

    dim: int = 2
    n_steps: int = 100
    hidden: tuple[int, ...] = (64, 64)  # the coupling networks' hidden widths

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.dim < 2 or self.n_steps < 1:
            raise ValueError(f"need dim >= 2 and n_steps >= 1, got {self.dim}, {self.n_steps}")


class GlowFlow(FlowModel):
    def __init__(self, arch: GlowArchitecture) -> None:
        super().__init__()
        self.arch = arch
        dim, n_steps, hidden = arch.dim, arch.n_steps, arch.hidden
        self.input_shape = (dim,)
        steps: list[Transform] = []
        for i in range(n_steps):
            steps += [ActNorm(dim), InvertibleLinear(dim), AffineCoupling(dim, hidden, swap=bool(i % 2))]
        self.flow = TransformSequence(*steps)
        self.priors = nn.ModuleList([make_prior((dim,), learnable=False)])

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        z, logdet = self.flow(in_model_dtype(self, x))
        return [z], logdet

    def inverse(self, zs: list[Tensor], *, report: InverseReport | None = None) -> Tensor:
        (z,) = zs
        return self.flow.inverse(in_model_dtype(self, z))


def matched_glow(reference: FlowModel, n_hidden_layers: int = 2) -> GlowFlow:
    """A Glow with the reference flow's depth and about its parameter count (hidden width solved for)."""
    dim = reference.input_shape[0]
    n_steps = len(reference.residual_blocks())
    target = n_parameters(reference) / n_steps
    n_cond, n_out = dim // 2, dim - dim // 2

    def per_step(width: int) -> int:
        conditioner = (n_cond + 1) * width + (n_hidden_layers - 1) * (width + 1) * width + (width + 1) * 2 * n_out
        return 2 * dim + dim * dim + conditioner  # actnorm + LU parameters + coupling network

    width = min(range(1, 4096), key=lambda w: abs(per_step(w) - target))
    return GlowFlow(GlowArchitecture(dim, n_steps, (width,) * n_hidden_layers))
