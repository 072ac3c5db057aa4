"""Batch augmentation on the device: random shifts (pad + crop) and horizontal flips."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(images: Tensor, max_shift: int) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill), per sample."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(images: Tensor) -> Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


@dataclass(frozen=True)
class Augmentation:
    max_shift: int = 0
    flip: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        images = random_shift(images, self.max_shift)
        return random_flip(images) if self.flip else images


# per dataset, as in the paper: small shifts for digits, pad-crop + flip for CIFAR, no flips for SVHN digits
AUGMENTATIONS: dict[str, Augmentation] = {
    "digits-mnist5k": Augmentation(max_shift=2),
    "digits8x8": Augmentation(max_shift=1),
    "mnist": Augmentation(max_shift=2),
    "fashion-mnist": Augmentation(max_shift=2),
    "cifar10": Augmentation(max_shift=4, flip=True),
    "cifar100": Augmentation(max_shift=4, flip=True),
    "svhn": Augmentation(max_shift=2),
}
