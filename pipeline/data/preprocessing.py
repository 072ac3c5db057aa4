"""From integer images to model inputs: padding, uniform dequantisation, batching."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.registry import ImageSplit


def dequantize(images: Tensor, n_levels: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``x = (v + u) / n_levels - 1/2`` with ``u ~ U[0, 1)``: continuous data in ``[-1/2, 1/2)``.

    Centring is volume preserving, so the bits/dim constant is ``log2(n_levels)``
    (:func:`pipeline.metrics.bits_per_dim`).
    """
    v = images.float()
    u = (
        torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        if generator is not None
        else torch.rand_like(v)
    )
    return (v + u) / n_levels - 0.5


def standardize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """A classifier's input: ``(v / 255 - mean) / std`` per channel, for uint8 images ``v`` (any device)."""
    mean, std = mean.to(images.device), std.to(images.device)
    return (images.float() / 255.0 - mean[:, None, None]) / std[:, None, None]


def pad_images(images: Tensor, pad: int, repeat_channels: int = 1) -> Tensor:
    """Zero-pad the spatial border by ``pad`` pixels (28x28 MNIST -> 32x32 for three squeezes), then repeat the
    channels ``repeat_channels`` times (the paper's code sees MNIST as 3-channel images: each copy is then
    dequantised on its own, and bits/dim are per the 3 x 32 x 32 dimensions the model sees)."""
    if repeat_channels < 1:
        raise ValueError(f"repeat_channels must be >= 1, got {repeat_channels}")
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    return padded.repeat(1, repeat_channels, 1, 1) if repeat_channels > 1 else padded


def iterate_batches(
    split: ImageSplit, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``(uint8 images, labels)``; the shuffle order is a function of ``seed`` alone,
    so a run resumed at an epoch boundary sees exactly the batches an uninterrupted run would."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield split.images[index], split.labels[index]


def epoch_batches(split: ImageSplit, batch_size: int, seed: int) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """``epoch -> batches``: a fresh shuffle per epoch, reproducible from ``(seed, epoch)`` (for resuming).

    Incomplete batches are dropped, so a batch larger than the split would train nothing: refused.
    """
    if batch_size > len(split):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(split)} training images, so no full batch exists; "
            f"use --batch-size {len(split)} or less"
        )

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        return iterate_batches(split, batch_size, shuffle=True, seed=seed * 100_003 + epoch, drop_last=True)

    return batches
