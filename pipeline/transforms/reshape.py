"""Volume-preserving reshapes: squeeze (space-to-depth), flattening, and injective zero padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.fields import documented
from pipeline.transforms.base import InverseReport, Transform, zeros_logdet

SQUEEZE_ORDERS = ("channel_major", "position_major")


@dataclass(frozen=True)
class SqueezeOptions:
    """The squeeze's field of every image architecture (flow, classifier), declared once here."""

    squeeze_order: str = documented(
        "channel_major", "a squeeze's channels: channel_major (pixel_unshuffle) or position_major (the paper's code)"
    )

    def check_squeeze_order(self) -> None:
        if self.squeeze_order not in SQUEEZE_ORDERS:
            raise ValueError(f"unknown squeeze_order {self.squeeze_order!r}; choose one of {list(SQUEEZE_ORDERS)}")


class Squeeze(Transform):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 patch becomes 4 channels. Log-det 0.

    ``order`` is where input channel ``c`` at patch position ``p = 2 dh + dw`` goes: ``channel_major`` to channel
    ``4c + p`` (``pixel_unshuffle``: each input channel's patch stays together), ``position_major`` to ``p C + c``
    (the paper's code: each position's channels together). They agree for one channel; a split after the squeeze
    then factors out different halves.
    """

    def __init__(self, order: str = "channel_major") -> None:
        super().__init__()
        if order not in SQUEEZE_ORDERS:
            raise ValueError(f"unknown squeeze order {order!r}; choose one of {list(SQUEEZE_ORDERS)}")
        self.order = order

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Squeeze needs (B, C, H, W) with even H and W, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        if self.order == "position_major":
            y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
            return y.reshape(b, 4 * c, h // 2, w // 2), zeros_logdet(x)
        if b == 0:  # pixel_unshuffle returns an empty batch unchanged, in the wrong shape
            return x.new_empty(0, 4 * c, h // 2, w // 2), zeros_logdet(x)
        return F.pixel_unshuffle(x, 2), zeros_logdet(x)

    def map(self, x: Tensor) -> Tensor:
        return self.forward(x)[0]

    def inverse(self, y: Tensor, *, report: InverseReport | None = None) -> Tensor:
        if y.dim() != 4 or y.shape[1] % 4:
            raise ValueError(f"inverse Squeeze needs (B, 4C, H, W), got shape {tuple(y.shape)}")
        b, c4, h, w = y.shape
        if self.order == "position_major":
            x = y.reshape(b, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2)
            return x.reshape(b, c4 // 4, 2 * h, 2 * w)
        if b == 0:
            return y.new_empty(0, c4 // 4, 2 * h, 2 * w)
        return F.pixel_shuffle(y, 2)

    def extra_repr(self) -> str:
        return "" if self.order == "channel_major" else f"order={self.order!r}"


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
