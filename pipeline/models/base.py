"""What every flow model shares: log-density, sampling and block-level diagnostics."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import cast

from torch import Tensor, nn

from pipeline.distributions import DiagonalGaussian
from pipeline.metrics import bits_per_dim
from pipeline.transforms.base import InverseReport
from pipeline.transforms.logdet import LogDetEstimator
from pipeline.transforms.residual import InvertibleResidualBlock, using_estimator


class FlowModel(nn.Module):
    """A flow ``x -> (z_1, ..., z_L)`` with one base distribution per latent.

    Subclasses implement ``forward(x) -> (zs, logdet)`` and ``inverse(zs, report) -> x`` and keep their
    base distributions in ``self.priors`` (aligned with ``zs``). The log-det estimator is chosen when the
    model is built; ``with model.estimator(ExactLogDet()): ...`` uses another for a while.
    """

    priors: nn.ModuleList
    input_shape: tuple[int, ...]

    @property
    def prior_list(self) -> Sequence[DiagonalGaussian]:
        """The base distributions, aligned with ``zs`` (the ``ModuleList`` that registers them, typed)."""
        return cast("Sequence[DiagonalGaussian]", self.priors)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
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
        return cast(Tensor, sum(prior.log_prob(z) for prior, z in zip(self.prior_list, zs, strict=True)))

    def log_prob(self, x: Tensor) -> Tensor:
        zs, logdet = self(x)
        return self.prior_log_prob(zs) + logdet

    def bits_per_dim(self, x: Tensor, *, n_levels: int = 256) -> Tensor:
        """Per-sample bits/dim of dequantised data with ``n_levels`` values per dimension."""
        return bits_per_dim(self.log_prob(x), self.dim, n_levels)

    def estimator(self, estimator: LogDetEstimator) -> AbstractContextManager[None]:
        """``with model.estimator(ExactLogDet()): ...``: every residual block uses ``estimator`` in the block."""
        return using_estimator(self, estimator)

    def sample_latents(self, n: int, *, temperature: float = 1.0) -> list[Tensor]:
        return [prior.sample(n, temperature=temperature) for prior in self.prior_list]

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
                raise RuntimeError("a residual block built without input_shape knows it after its first call")
            n = 1
            for s in block.input_shape:
                n *= s
            dims.append(n)
        return dims

    def lipschitz_bounds(self, *, method: str = "certified") -> list[float]:
        """Upper bound on ``Lip(g)`` for every residual block, in order."""
        return [block.lipschitz_bound(method=method) for block in self.residual_blocks()]


def in_model_dtype(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` cast to the dtype of ``model``'s parameters, at the model's boundary: a model computes in its own
    precision whatever its input's (float16 data through a float32 flow would otherwise run the logit transform
    and the log-det in half precision). Integer data (undequantised pixels) is refused."""
    if not x.is_floating_point():
        raise TypeError(
            f"{type(model).__name__} expects floating-point data (dequantised pixels, pipeline.data.dequantize), "
            f"got {x.dtype}"
        )
    parameter = next(model.parameters(), None)
    return x if parameter is None or x.dtype == parameter.dtype else x.to(parameter.dtype)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_prior(shape: tuple[int, ...], learnable: bool) -> DiagonalGaussian:
    return DiagonalGaussian(shape, learnable=learnable)


def load_weights(model: nn.Module, state: object, source: str) -> None:
    """``model.load_state_dict(state)``, or one ValueError saying how the weights from ``source`` do not fit
    (:func:`check_weights_fit`)."""
    check_weights_fit(model, state, source)
    model.load_state_dict(state)  # type: ignore[arg-type]


def check_weights_fit(model: nn.Module, state: object, source: str) -> None:
    """One ValueError saying how the weights from ``source`` do not fit ``model`` (missing and unexpected tensors,
    other shapes), where ``load_state_dict``'s own error is a page per tensor; nothing is loaded."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source} holds no weights (a dict of tensors expected, found {type(state).__name__})")
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (the model's is {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape and v.numel()  # an empty buffer takes its shape on loading
    ]
    for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
        if names:
            problems.append(f"{len(names)} tensors {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
    if problems:
        raise ValueError(f"the weights in {source} do not fit this model ({'; '.join(problems)})")
