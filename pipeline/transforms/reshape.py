"""Volume-preserving reshapes: squeeze (space-to-depth), flattening, and injective zero padding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.transforms.base import InverseReport, Transform, zeros_logdet


class Squeeze(Transform):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 patch becomes 4 channels. Log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Squeeze needs (B, C, H, W) with even H and W, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:  # pixel_unshuffle returns an empty batch unchanged, in the wrong shape
            b, c, h, w = x.shape
            return x.new_empty(0, 4 * c, h // 2, w // 2), zeros_logdet(x)
        return F.pixel_unshuffle(x, 2), zeros_logdet(x)

    def map(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(f"inverse Squeeze needs (B, 4C, H, W), got shape {tuple(y.shape)}")
        if y.shape[0] == 0:
            b, c, h, w = y.shape
            return y.new_empty(0, c // 4, 2 * h, 2 * w)
        return F.pixel_shuffle(y, 2)


class Flatten(Transform):
    """``(B, *shape) -> (B, prod(shape))``, e.g. before fully connected blocks on a feature map. Log-det 0."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Flatten expects (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.flatten(1), zeros_logdet(x)

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return str(self.shape)


class Unflatten(Flatten):
    """The inverse of :class:`Flatten`: ``(B, prod(shape)) -> (B, *shape)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().inverse(x), zeros_logdet(x)

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        return super().forward(y)[0]


class InjectivePad(nn.Module):
    """Append ``n_channels`` zero channels (injective, not a bijection: a classifier stem only).

    The inverse drops them again; what the network put there is the reconstruction's residue.
    """

    def __init__(self, n_channels: int) -> None:
        super().__init__()
        if n_channels < 0:
            raise ValueError(f"n_channels must be >= 0, got {n_channels}")
        self.n_channels = n_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.n_channels)) if self.n_channels else x

    def inverse(self, y: Tensor) -> Tensor:
        return y[:, : y.shape[1] - self.n_channels] if self.n_channels else y

    def extra_repr(self) -> str:
        return str(self.n_channels)
