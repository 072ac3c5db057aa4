"""i-ResNet flow for low-dimensional vectors (the paper's 2-D toy densities, Fig. 2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from pipeline.fields import documented
from pipeline.layers.activations import ACTIVATIONS
from pipeline.layers.branches import mlp_branch
from pipeline.layers.spectral import LipschitzOptions, SpectralConfig
from pipeline.models.base import FlowModel, in_model_dtype, make_prior
from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import ExactLogDet, LogDetEstimator
from pipeline.transforms.residual import InvertibleResidualBlock


@dataclass(frozen=True)
class VectorFlowArchitecture(LipschitzOptions):
    """Architecture of :class:`VectorFlow`; the spectral normalisation's fields are :class:`LipschitzOptions`'."""

    dim: int = documented(2, "dimension of the points")
    n_blocks: int = documented(100, "residual blocks of the vector flow (>= 1)")
    hidden: tuple[int, ...] = documented((64, 64, 64), "hidden widths of each block's MLP branch, e.g. 64,64,64")
    activation: str = documented("elu", "the branches' 1-Lipschitz activation (elu, lipswish, softplus, ...)")
    actnorm: bool = documented(True, "ActNorm after each block, as in the paper's toy model")
    learnable_prior: bool = documented(False, "learned diagonal-Gaussian prior (else standard normal)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.dim < 1 or self.n_blocks < 1 or not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"dim, n_blocks and hidden widths must be >= 1, got {self}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        _ = self.spectral  # validates the spectral settings

    @property
    def spectral(self) -> SpectralConfig:
        """The spectral normalisation of every branch layer (a flow's branches are always constrained)."""
        return self.constrained_spectral_config()


class VectorFlow(FlowModel):
    """``n_blocks`` x (residual block with an MLP branch, then ActNorm); exact log-det by default."""

    def __init__(
        self,
        arch: VectorFlowArchitecture,
        *,
        estimator: LogDetEstimator | None = None,
        inverse_config: FixedPointConfig | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.input_shape = (arch.dim,)
        estimator = estimator or ExactLogDet()
        steps: list[Transform] = []
        for _ in range(arch.n_blocks):
            branch = mlp_branch(
                arch.dim,
                arch.hidden,
                activation=arch.activation,
                spectral=arch.spectral,
            )
            steps.append(
                InvertibleResidualBlock(
                    branch, estimator=estimator, inverse_config=inverse_config, input_shape=(arch.dim,)
                )
            )
            if arch.actnorm:
                steps.append(ActNorm(arch.dim))
        self.flow = TransformSequence(*steps)
        self.priors = nn.ModuleList([make_prior((arch.dim,), arch.learnable_prior)])

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        if x.dim() != 2 or x.shape[1] != self.arch.dim:
            raise ValueError(f"VectorFlow expects (B, {self.arch.dim}), got {tuple(x.shape)}")
        z, logdet = self.flow(in_model_dtype(self, x))
        return [z], logdet

    def inverse(self, zs: list[Tensor], *, report: InverseReport | None = None) -> Tensor:
        (z,) = zs
        return self.flow.inverse(in_model_dtype(self, z), report=report)


VECTOR_FLOW_PRESETS: dict[str, VectorFlowArchitecture] = {
    "paper": VectorFlowArchitecture(),
    "quick": VectorFlowArchitecture(n_blocks=10, hidden=(32, 32, 32), n_power_iterations=1),
}


def vector_flow(preset: str = "quick", *, estimator: LogDetEstimator | None = None, **overrides) -> VectorFlow:
    try:
        arch = VECTOR_FLOW_PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown vector-flow preset {preset!r}; choose one of {sorted(VECTOR_FLOW_PRESETS)}"
        ) from None
    return VectorFlow(replace(arch, **overrides), estimator=estimator)
