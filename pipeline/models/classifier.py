"""i-ResNet classifier and its vanilla ResNet baseline (paper App. C.2).

Injective zero padding of the input channels, an optional initial squeeze, then stages of
(ActNorm +) residual blocks with invertible downsampling (squeeze) between them, and a head
BatchNorm -> nonlinearity -> global average pool -> linear. With ``coeff`` set, the feature map is
invertible and :meth:`ResidualClassifier.reconstruct` recovers the input from the features.
``coeff=None`` gives the paper's "vanilla" network: the same architecture, unconstrained
(:func:`classifier_variant` names the paper's three models on one architecture).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from torch import Tensor, nn

from pipeline.fields import documented
from pipeline.layers.activations import ACTIVATIONS, make_activation
from pipeline.layers.branches import conv_branch
from pipeline.layers.spectral import LipschitzOptions, SpectralConfig
from pipeline.models.base import in_model_dtype
from pipeline.transforms.actnorm import ActNorm
from pipeline.transforms.base import InverseReport, Transform, TransformSequence
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.reshape import InjectivePad, Squeeze, SqueezeOptions
from pipeline.transforms.residual import InvertibleResidualBlock

NORMS = ("actnorm", "none")


@dataclass(frozen=True)
class ClassifierArchitecture(LipschitzOptions, SqueezeOptions):
    """Architecture of :class:`ResidualClassifier`; validated on construction. The spectral normalisation's fields
    are :class:`~pipeline.layers.spectral.LipschitzOptions`' (``coeff=None``: unconstrained, vanilla branches)."""

    input_shape: tuple[int, int, int] = documented((3, 32, 32), "(C, H, W) of the input images")
    num_classes: int = documented(10, "classes of the linear head (>= 2)")
    n_blocks: tuple[int, ...] = documented((7, 7, 7), "residual blocks per stage, e.g. 13,13,13")
    hidden_channels: tuple[int, ...] = documented((32, 64, 128), "bottleneck width of each stage's branches")
    strides: tuple[int, ...] = documented((1, 2, 2), "per stage: 1, or 2 for an invertible downsampling (squeeze)")
    injective_padding: int = documented(13, "zero channels appended to the input (injective padding), >= 0")
    init_squeeze: bool = documented(False, "squeeze (space to depth) the input before the first stage")
    kernel_sizes: tuple[int, ...] = documented((3, 1, 3), "kernel size of each convolution in a branch, e.g. 3,1,3")
    activation: str = documented("elu", "the branches' activation (elu, lipswish, softplus, ...)")
    # the paper's classifier: one power iteration per step
    n_power_iterations: int = documented(1, "power-iteration steps per training forward (>= 1, warm-started)")
    norm: str = documented("actnorm", "normalisation before each block: actnorm or none")
    branch_batchnorm: bool = documented(False, "BatchNorm inside each branch (the vanilla ResNet-BN only)")
    # the paper's code: BatchNorm2d(momentum=0.9), then ReLU, whatever the branches use
    head_activation: str | None = documented(
        None, "the head's activation (relu: the paper's code); unset: the branches'"
    )
    head_batchnorm_momentum: float = documented(
        0.1, "the head BatchNorm's running-statistics momentum, in (0, 1] (the paper's code: 0.9)"
    )

    def __post_init__(self) -> None:
        for name in ("input_shape", "n_blocks", "hidden_channels", "strides", "kernel_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not (len(self.n_blocks) == len(self.hidden_channels) == len(self.strides)) or not self.n_blocks:
            raise ValueError("n_blocks, hidden_channels and strides need one entry per stage")
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2 (2 = invertible downsampling), got {self.strides}")
        for name, value in (("activation", self.activation), ("head_activation", self.head_activation)):
            if value is not None and value not in ACTIVATIONS:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(ACTIVATIONS)}")
        if not 0.0 < self.head_batchnorm_momentum <= 1.0:
            raise ValueError(f"head_batchnorm_momentum must be in (0, 1], got {self.head_batchnorm_momentum}")
        self.check_squeeze_order()
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        _ = self.spectral  # validates the spectral settings
        if self.branch_batchnorm and self.coeff is not None:
            raise ValueError("branch_batchnorm voids the invertibility guarantee; use it only with coeff=None")
        self.stage_shapes()

    @property
    def spectral(self) -> SpectralConfig | None:
        """The spectral normalisation of every branch layer (``None``: unconstrained, for ``coeff=None``)."""
        return self.spectral_config()

    @property
    def invertible(self) -> bool:
        """Whether the feature map is guaranteed invertible (by construction, before certification)."""
        return self.coeff is not None and not self.branch_batchnorm

    def stage_shapes(self) -> list[tuple[int, int, int]]:
        c, h, w = self.input_shape
        c += self.injective_padding
        squeezes = [self.init_squeeze] + [False] * (len(self.n_blocks) - 1)
        shapes = []
        for stage, stride in enumerate(self.strides):
            for do_squeeze in (squeezes[stage], stride == 2):
                if do_squeeze:
                    if h % 2 or w % 2:
                        raise ValueError(f"input {self.input_shape} cannot be downsampled at stage {stage} ({h}x{w})")
                    c, h, w = 4 * c, h // 2, w // 2
            shapes.append((c, h, w))
        return shapes


class ResidualClassifier(nn.Module):
    """Residual classifier; invertible feature map when built with a Lipschitz coefficient."""

    def __init__(self, arch: ClassifierArchitecture, *, inverse_config: FixedPointConfig | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.pad = InjectivePad(arch.injective_padding)
        stages: list[Transform] = []
        first = True
        for stage, (n_blocks, hidden, stride, (c, h, w)) in enumerate(
            zip(arch.n_blocks, arch.hidden_channels, arch.strides, arch.stage_shapes(), strict=True)
        ):
            steps: list[Transform] = []
            if stage == 0 and arch.init_squeeze:
                steps.append(Squeeze(arch.squeeze_order))
            if stride == 2:
                steps.append(Squeeze(arch.squeeze_order))
            for _ in range(n_blocks):
                if arch.norm == "actnorm":
                    steps.append(ActNorm(c))
                branch = conv_branch(
                    c,
                    hidden,
                    kernel_sizes=arch.kernel_sizes,
                    activation=arch.activation,
                    spectral=arch.spectral,
                    preactivation=not first,  # pre-activation blocks, as in the paper's classifier
                    batchnorm=arch.branch_batchnorm,
                )
                steps.append(InvertibleResidualBlock(branch, inverse_config=inverse_config, input_shape=(c, h, w)))
                first = False
            stages.append(TransformSequence(*steps))
        self.stages = nn.ModuleList(stages)
        c_out = arch.stage_shapes()[-1][0]
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_out, momentum=arch.head_batchnorm_momentum),
            make_activation(arch.head_activation or arch.activation),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_out, arch.num_classes),
        )

    @property
    def _stage_list(self) -> Sequence[Transform]:
        return cast("Sequence[Transform]", self.stages)

    def features(self, x: Tensor) -> Tensor:
        """The (invertible, for an i-ResNet) feature map before the head."""
        h = self.pad(in_model_dtype(self, x))
        for stage in self._stage_list:
            h = stage.map(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def reconstruct(self, features: Tensor, *, report: InverseReport | None = None) -> Tensor:
        """Invert the feature map by fixed-point iteration and drop the padded channels."""
        h = features
        for stage in reversed(self._stage_list):
            h = stage.inverse(h, report=report)
        return self.pad.inverse(h)

    def residual_blocks(self) -> list[InvertibleResidualBlock]:
        return [m for m in self.modules() if isinstance(m, InvertibleResidualBlock)]


# where the paper's code (jhjacobsen/invertible-resnet, conv_iResNet) differs from this library's defaults
PAPER_CODE: dict = dict(squeeze_order="position_major", head_activation="relu", head_batchnorm_momentum=0.9)

CLASSIFIER_PRESETS: dict[str, ClassifierArchitecture] = {
    # the classify entry point's default: minutes on two CPU cores (28x28 digits)
    "quick": ClassifierArchitecture(
        input_shape=(1, 28, 28), n_blocks=(4, 4, 4), hidden_channels=(16, 32, 64), injective_padding=3
    ),
    # the public reference script: 7-7-7 blocks, 32-64-128 bottlenecks, c=0.9, 1 power iteration
    "mnist": ClassifierArchitecture(input_shape=(1, 28, 28), injective_padding=3),
    "cifar10": ClassifierArchitecture(),
    "cifar100": ClassifierArchitecture(num_classes=100),
    # App. C.2: 39 pre-activation bottleneck blocks (13 per stage), injective padding of the input channels; the
    # paper's code's squeeze order and head (ReLU after BatchNorm with momentum 0.9)
    "paper-mnist": ClassifierArchitecture(
        input_shape=(1, 28, 28), n_blocks=(13, 13, 13), injective_padding=3, **PAPER_CODE
    ),
    "paper-cifar10": ClassifierArchitecture(n_blocks=(13, 13, 13), **PAPER_CODE),
    "paper-cifar100": ClassifierArchitecture(n_blocks=(13, 13, 13), num_classes=100, **PAPER_CODE),
}
CLASSIFIER_MODELS = ("iresnet", "resnet", "resnet-bn")


def classifier_variant(arch: ClassifierArchitecture, model: str) -> ClassifierArchitecture:
    """The paper's three models on one architecture (Table 2).

    ``iresnet``: as given (spectrally normalised, invertible); ``resnet``: the same, unconstrained
    (``coeff=None``); ``resnet-bn``: unconstrained, BatchNorm inside the branches instead of ActNorm before them.
    """
    if model == "iresnet":
        if arch.coeff is None:
            raise ValueError("an i-ResNet needs a Lipschitz coefficient; use model 'resnet' for the vanilla network")
        return arch
    if model == "resnet":
        return replace(arch, coeff=None, power_tol=0.0)
    if model == "resnet-bn":
        return replace(arch, coeff=None, power_tol=0.0, norm="none", branch_batchnorm=True)
    raise ValueError(f"unknown model {model!r}; choose one of {CLASSIFIER_MODELS}")


def _preset(preset: str) -> ClassifierArchitecture:
    try:
        return CLASSIFIER_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown classifier preset {preset!r}; choose one of {sorted(CLASSIFIER_PRESETS)}") from None


def iresnet_classifier(
    preset: str = "cifar10", *, inverse_config: FixedPointConfig | None = None, **overrides
) -> ResidualClassifier:
    """i-ResNet classifier from a named preset (any :class:`ClassifierArchitecture` field overridable)."""
    arch = classifier_variant(replace(_preset(preset), **overrides), "iresnet")
    return ResidualClassifier(arch, inverse_config=inverse_config)


def resnet_classifier(preset: str = "cifar10", *, batchnorm: bool = False, **overrides) -> ResidualClassifier:
    """The vanilla baseline: same architecture, no Lipschitz constraint, optionally BatchNorm in the branches."""
    arch = classifier_variant(replace(_preset(preset), **overrides), "resnet-bn" if batchnorm else "resnet")
    return ResidualClassifier(arch)
