"""Multi-scale i-ResNet flow for images (paper App. C.3, after Real-NVP / Glow).

An optional logit transform maps the dequantised data onto the real line first. Each level squeezes
(space-to-depth), applies ``n_blocks`` steps of ActNorm (+ optionally Glow's invertible 1x1 convolution) + invertible
residual block, and, except the last, factors out half of its channels as a latent with its own learned
diagonal-Gaussian prior; with ``split_prior="conditional"`` that prior's mean and scale also depend on the other half
(Glow's learned prior).
The last level may end with fully connected residual blocks on its flattened map (Residual Flows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import Tensor, nn

from pipeline.fields import documented
from pipeline.layers.activations import ACTIVATIONS
from pipeline.layers.branches import conv_branch, mlp_branch
from pipeline.layers.spectral import LipschitzOptions, SpectralConfig
from pipeline.models.base import FlowModel, in_model_dtype, make_prior
from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.coupling import InvertibleLinear, SplitPriorCoupling
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import LogDetEstimator, PowerSeriesLogDet
from pipeline.transforms.logit import LogitTransform
from pipeline.transforms.reshape import Flatten, Squeeze, SqueezeOptions, Unflatten
from pipeline.transforms.residual import InvertibleResidualBlock

SPLIT_PRIORS = ("unconditional", "conditional")


@dataclass(frozen=True)
class FlowArchitecture(LipschitzOptions, SqueezeOptions):
    """Architecture of :class:`IResNetFlow`; validated on construction. The spectral normalisation's fields
    (``coeff``, ``n_power_iterations``, ``power_tol``, ``lipschitz``) are :class:`LipschitzOptions`'."""

    input_shape: tuple[int, int, int] = documented((1, 28, 28), "(C, H, W) of the flow's input")
    n_blocks: tuple[int, ...] = documented((32, 32, 32), "residual blocks per level (scale), e.g. 32,32,32")
    hidden_channels: int | tuple[int, ...] = documented(
        32, "bottleneck width of each branch: one for every level, or one per level"
    )
    kernel_sizes: tuple[int, ...] = documented((3, 1, 3), "kernel size of each convolution in a branch, e.g. 3,1,3")
    activation: str = documented("elu", "the branches' 1-Lipschitz activation (elu, lipswish, softplus, ...)")
    actnorm: bool = documented(True, "ActNorm before every residual block")
    learnable_prior: bool = documented(True, "learned diagonal-Gaussian prior per latent (else standard normal)")
    squeeze_first: bool = documented(True, "squeeze (space to depth) before the first level too, as the paper's code")
    logit_alpha: float = documented(
        0.0, "> 0: logit transform of the data first, with this alpha in (0, 1/2) (1e-6 on MNIST); 0: none"
    )
    fc_blocks: int = documented(0, "fully connected residual blocks after the last level (Residual Flows); >= 0")
    fc_hidden: int = documented(128, "hidden width of the fully connected blocks", applies=lambda o: o["fc_blocks"] > 0)
    split_prior: str = documented(
        "unconditional", "prior of each factored-out half: unconditional, or conditional on the other half (Glow)"
    )
    # a learned mixing of the channels, exact log-det, that a block with Lip(g) < 1 can only approximate
    invertible_1x1: bool = documented(False, "Glow's invertible 1x1 convolution before every residual block")
    # the paper's code (conv_iresnet_block's input_nonlin): a 1-Lipschitz map first leaves Lip(g) bounded as before
    input_activation: bool = documented(
        False, "the activation on each residual block's input, before its first layer (all but the flow's first)"
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "n_blocks", tuple(self.n_blocks))
        object.__setattr__(self, "kernel_sizes", tuple(self.kernel_sizes))
        hidden = (self.hidden_channels,) if isinstance(self.hidden_channels, int) else tuple(self.hidden_channels)
        widths = hidden * len(self.n_blocks) if len(hidden) == 1 else hidden
        object.__setattr__(self, "hidden_channels", widths)
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if not self.n_blocks or min(self.n_blocks) < 1:
            raise ValueError(f"n_blocks needs at least one level with >= 1 block each, got {self.n_blocks}")
        if len(widths) != len(self.n_blocks) or min(widths) < 1:
            raise ValueError(f"hidden_channels needs one width >= 1 (or one per level), got {self.hidden_channels}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be 0 (no logit transform) or in (0, 1/2), got {self.logit_alpha}")
        if self.fc_blocks < 0 or self.fc_hidden < 1:
            raise ValueError(f"fc_blocks must be >= 0 and fc_hidden >= 1, got {self.fc_blocks} and {self.fc_hidden}")
        self.check_squeeze_order()
        if self.split_prior not in SPLIT_PRIORS:
            raise ValueError(f"unknown split_prior {self.split_prior!r}; choose one of {list(SPLIT_PRIORS)}")
        _ = self.spectral  # validates the spectral settings
        self.level_shapes()  # raises on sizes that do not squeeze/split

    @property
    def spectral(self) -> SpectralConfig:
        """The spectral normalisation of every branch layer (a flow's branches are always constrained)."""
        return self.constrained_spectral_config()

    def level_shapes(self) -> list[tuple[int, int, int]]:
        """The (C, H, W) each level's blocks act on."""
        c, h, w = self.input_shape
        shapes = []
        for level in range(len(self.n_blocks)):
            if level > 0 or self.squeeze_first:
                if h % 2 or w % 2:
                    raise ValueError(
                        f"input {self.input_shape} cannot be squeezed {len(self.n_blocks)} times "
                        f"(level {level} sees {h}x{w}); pad the data or use fewer levels"
                    )
                c, h, w = 4 * c, h // 2, w // 2
            shapes.append((c, h, w))
            if level < len(self.n_blocks) - 1:
                if c % 2:
                    raise ValueError(f"level {level} has {c} channels, which cannot be split in half")
                c //= 2
        return shapes


class IResNetFlow(FlowModel):
    """Multi-scale density model; ``log_prob``, ``sample(n, temperature)``, ``inverse``."""

    def __init__(
        self,
        arch: FlowArchitecture,
        *,
        estimator: LogDetEstimator | None = None,
        inverse_config: FixedPointConfig | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.input_shape = arch.input_shape
        estimator = estimator or PowerSeriesLogDet()
        levels: list[Transform] = []
        priors = []
        shapes = arch.level_shapes()
        for level, (n_blocks, hidden, (c, h, w)) in enumerate(
            zip(arch.n_blocks, cast("tuple[int, ...]", arch.hidden_channels), shapes, strict=True)  # one per level
        ):
            steps: list[Transform] = []
            if level == 0 and arch.logit_alpha:
                steps.append(LogitTransform(arch.logit_alpha))
            if level > 0 or arch.squeeze_first:
                steps.append(Squeeze(arch.squeeze_order))
            for block in range(n_blocks):
                if arch.actnorm:
                    steps.append(ActNorm(c))
                if arch.invertible_1x1:
                    steps.append(InvertibleLinear(c))
                branch = conv_branch(
                    c,
                    hidden,
                    kernel_sizes=arch.kernel_sizes,
                    activation=arch.activation,
                    spectral=arch.spectral,
                    preactivation=arch.input_activation and (level, block) != (0, 0),
                )
                steps.append(
                    InvertibleResidualBlock(
                        branch, estimator=estimator, inverse_config=inverse_config, input_shape=(c, h, w)
                    )
                )
            last = level == len(arch.n_blocks) - 1
            if last and arch.fc_blocks:
                steps += self._fc_stage(arch, (c, h, w), estimator, inverse_config)
            if not last and arch.split_prior == "conditional":
                steps.append(SplitPriorCoupling(c))
            levels.append(TransformSequence(*steps))
            priors.append(make_prior((c, h, w) if last else (c // 2, h, w), arch.learnable_prior))
        self.levels = nn.ModuleList(levels)
        self.priors = nn.ModuleList(priors)

    @staticmethod
    def _fc_stage(
        arch: FlowArchitecture,
        shape: tuple[int, int, int],
        estimator: LogDetEstimator,
        inverse_config: FixedPointConfig | None,
    ) -> list[Transform]:
        """ActNorm + a residual block with an MLP branch, ``fc_blocks`` times, on the flattened last level."""
        dim = shape[0] * shape[1] * shape[2]
        steps: list[Transform] = [Flatten(shape)]
        for _ in range(arch.fc_blocks):
            if arch.actnorm:
                steps.append(ActNorm(dim))
            branch = mlp_branch(
                dim,
                (arch.fc_hidden,) * 2,
                activation=arch.activation,
                spectral=arch.spectral,
                preactivation=arch.input_activation,
            )
            steps.append(
                InvertibleResidualBlock(branch, estimator=estimator, inverse_config=inverse_config, input_shape=(dim,))
            )
        return [*steps, Unflatten(shape)]

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"IResNetFlow expects inputs of shape (B, {self.input_shape}), got {tuple(x.shape)}")
        x = in_model_dtype(self, x)
        zs = []
        logdet = x.new_zeros(x.shape[0])
        h = x
        for level, transform in enumerate(self.levels):
            h, ld = transform(h)
            logdet = logdet + ld
            if level < len(self.levels) - 1:
                z, h = h.chunk(2, dim=1)
                zs.append(z)
        zs.append(h)
        return zs, logdet

    def inverse(self, zs: list[Tensor], *, report: InverseReport | None = None) -> Tensor:
        if len(zs) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(zs)}")
        zs = [in_model_dtype(self, z) for z in zs]
        h = zs[-1]
        levels = cast("Sequence[Transform]", self.levels)
        for level in reversed(range(len(levels))):
            if level < len(levels) - 1:
                h = torch.cat([zs[level], h], dim=1)
            h = levels[level].inverse(h, report=report)
        return h


# --- presets (data, not code) -----------------------------------------------------------------
# where the paper's code's flow blocks differ from this library's defaults: an ELU on every block's input but the
# first, its squeeze's channel order
PAPER_CODE: dict = dict(input_activation=True, squeeze_order="position_major")

FLOW_PRESETS: dict[str, FlowArchitecture] = {
    # the main job's flow, minutes on two CPU cores (28x28 digits: 2 levels of 6 narrow blocks). Each choice was the
    # best measured on validation at its CPU budget (docs/benchmarks.md): deeper and narrower (6+6 blocks of 16
    # filters: 1.337 bits/dim against 1.406 for 4+4 of 32, at the same cost per step), c = 0.99 (stage 3, with the
    # main job's warm-up, rate and batch), a power iteration close to converged, LipSwish, the logit transform
    # first, Glow's conditional split prior and 2 fully connected blocks at the end
    "quick": FlowArchitecture(
        input_shape=(1, 28, 28),
        n_blocks=(6, 6),
        hidden_channels=16,
        coeff=0.99,
        n_power_iterations=10,
        activation="lipswish",
        logit_alpha=1e-6,
        split_prior="conditional",
        fc_blocks=2,
    ),
    # App. C.3: 3 scales of 32 blocks, 32 filters; MNIST padded to 32x32 as in the reference code
    "mnist": FlowArchitecture(input_shape=(1, 32, 32), n_blocks=(32, 32, 32), hidden_channels=32),
    # App. C.3: 3 scales of 32 blocks, 512 filters
    "cifar10": FlowArchitecture(input_shape=(3, 32, 32), n_blocks=(32, 32, 32), hidden_channels=512),
    # the same flows block for block as the paper's code (jhjacobsen/invertible-resnet); MNIST as 3-channel 32x32
    # images (the data's side of it)
    "paper-mnist": FlowArchitecture(input_shape=(3, 32, 32), n_blocks=(32, 32, 32), hidden_channels=32, **PAPER_CODE),
    "paper-cifar10": FlowArchitecture(
        input_shape=(3, 32, 32), n_blocks=(32, 32, 32), hidden_channels=512, **PAPER_CODE
    ),
}


def iresnet_flow(
    preset: str = "quick",
    *,
    estimator: LogDetEstimator | None = None,
    inverse_config: FixedPointConfig | None = None,
    **overrides,
) -> IResNetFlow:
    """Build a flow from a named preset, with any :class:`FlowArchitecture` field overridden."""
    try:
        arch = FLOW_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown flow preset {preset!r}; choose one of {sorted(FLOW_PRESETS)}") from None
    return IResNetFlow(replace(arch, **overrides), estimator=estimator, inverse_config=inverse_config)


__all__ = [
    "FLOW_PRESETS",
    "FlowArchitecture",
    "IResNetFlow",
    "iresnet_flow",
]
