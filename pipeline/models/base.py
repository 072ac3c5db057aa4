"""What every flow model shares: log-density, sampling and block-level diagnostics."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.distributions import DiagonalGaussian
from pipeline.metrics import bits_per_dim
from pipeline.transforms.base import InverseReport
from pipeline.transforms.logdet import LogDetEstimator
from pipeline.transforms.residual import InvertibleResidualBlock


class FlowModel(nn.Module):
    """A flow ``x -> (z_1, ..., z_L)`` with one base distribution per latent.

    Subclasses implement ``forward(x, estimator) -> (zs, logdet)`` and ``inverse(zs, report) -> x``
    and keep their base distributions in ``self.priors`` (aligned with ``zs``).
    """

    priors: nn.ModuleList

    def forward(self, x: Tensor, *, estimator: LogDetEstimator | None = None) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    def inverse(self, zs: list[Tensor], *, report: InverseReport | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """Number of data dimensions per sample."""
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def prior_log_prob(self, zs: list[Tensor]) -> Tensor:
        """Sum of the base distributions' log-densities of the latents."""
        return sum(prior.log_prob(z) for prior, z in zip(self.priors, zs, strict=True))

    def log_prob(self, x: Tensor, *, estimator: LogDetEstimator | None = None) -> Tensor:
        zs, logdet = self(x, estimator=estimator)
        return self.prior_log_prob(zs) + logdet

    def bits_per_dim(self, x: Tensor, *, n_levels: int = 256, estimator: LogDetEstimator | None = None) -> Tensor:
        """Per-sample bits/dim of dequantised data with ``n_levels`` values per dimension."""
        return bits_per_dim(self.log_prob(x, estimator=estimator), self.dim, n_levels)

    def sample_latents(self, n: int, *, temperature: float = 1.0) -> list[Tensor]:
        return [prior.sample(n, temperature=temperature) for prior in self.priors]

    def sample(self, n: int, *, temperature: float = 1.0, report: InverseReport | None = None) -> Tensor:
        """Draw ``n`` samples (temperature scales the prior's standard deviation)."""
        return self.inverse(self.sample_latents(n, temperature=temperature), report=report)

    def residual_blocks(self) -> list[InvertibleResidualBlock]:
        return [m for m in self.modules() if isinstance(m, InvertibleResidualBlock)]

    def block_dims(self) -> list[int]:
        """Dimension of each residual block's input (after a forward has recorded the shapes)."""
        dims = []
        for block in self.residual_blocks():
            if block.input_shape is None:
                raise RuntimeError("run a forward pass first: block input sizes are recorded on first use")
            n = 1
            for s in block.input_shape:
                n *= s
            dims.append(n)
        return dims

    def lipschitz_bounds(self, *, method: str = "certified") -> list[float]:
        """Upper bound on ``Lip(g)`` for every residual block, in order."""
        return [block.lipschitz_bound(method=method) for block in self.residual_blocks()]

    def set_estimator(self, estimator: LogDetEstimator) -> None:
        """Make ``estimator`` the default of every residual block."""
        for block in self.residual_blocks():
            block.estimator = estimator


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_prior(shape: tuple[int, ...], learnable: bool) -> DiagonalGaussian:
    return DiagonalGaussian(shape, learnable=learnable)
