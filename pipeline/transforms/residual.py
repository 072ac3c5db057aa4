"""The invertible residual block ``F(x) = x + g(x)`` with ``Lip(g) < 1``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from pipeline.attributes import temporarily_set
from pipeline.layers.branches import branch_lipschitz_bound
from pipeline.layers.spectral import frozen_power_iteration
from pipeline.transforms.base import InverseReport, Transform
from pipeline.transforms.inverse import FixedPointConfig, fixed_point_inverse
from pipeline.transforms.logdet import LogDetEstimator, PowerSeriesLogDet


class InvertibleResidualBlock(Transform):
    """``y = x + g(x)``; log-determinant by a selectable estimator; inverse by fixed point.

    ``estimator`` is the block's log-det estimator; :func:`using_estimator` swaps it for a while.
    ``input_shape`` (per sample) is given by the models, which know it; a block built alone records it on
    its first call.
    """

    def __init__(
        self,
        branch: nn.Module,
        *,
        estimator: LogDetEstimator | None = None,
        inverse_config: FixedPointConfig | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.estimator = estimator if estimator is not None else PowerSeriesLogDet()
        self.inverse_config = inverse_config if inverse_config is not None else FixedPointConfig()
        # per-sample shape: given by a model that knows it, else recorded on the first call
        self.input_shape: tuple[int, ...] | None = tuple(input_shape) if input_shape is not None else None

    def _remember_shape(self, x: Tensor) -> None:
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._remember_shape(x)
        gx, logdet = self.estimator(self.branch, x)
        return x + gx, logdet

    def map(self, x: Tensor) -> Tensor:
        self._remember_shape(x)
        return x + self.branch(x)

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        # one fixed operator for the whole solve (and its implicit gradient), even in training mode
        with frozen_power_iteration(self.branch):
            result = fixed_point_inverse(self.branch, y, self.inverse_config)
        if report is not None:
            report.iterations.append(int(result.iterations.max()) if y.shape[0] else 0)
            report.max_residual.append(float(result.residual.max()) if y.shape[0] else 0.0)  # max() keeps a NaN
            report.n_not_converged.append(int((~result.converged).sum()))
            report.n_fallback.append(int(result.fell_back.sum()))
        return result.x

    def lipschitz_bound(self, *, method: str = "certified") -> float:
        """Upper bound on ``Lip(g)`` (``"certified"``, ``"dense"`` or the power-iteration ``"estimate"``)."""
        shape = self.input_shape
        input_hw = (shape[1], shape[2]) if shape is not None and len(shape) == 3 else None
        return branch_lipschitz_bound(self.branch, method=method, input_hw=input_hw)


@contextmanager
def using_estimator(module: nn.Module, estimator: LogDetEstimator) -> Iterator[None]:
    """Every residual block inside ``module`` computes its log-det with ``estimator`` within the context.

    E.g. the exact log-det for an evaluation of a model trained with the series; each block's own
    estimator is restored on exit, also on an error.
    """
    blocks = [m for m in module.modules() if isinstance(m, InvertibleResidualBlock)]
    with temporarily_set(blocks, "estimator", estimator):
        yield
