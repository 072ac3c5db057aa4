"""Density metrics."""

from __future__ import annotations

import math

from torch import Tensor


def bits_per_dim(log_prob: Tensor, n_dims: int, n_levels: int = 256) -> Tensor:
    """Bits per dimension of discrete data with ``n_levels`` values per dimension.

    ``log_prob`` is the continuous log-density of the dequantised data scaled to unit bins
    (``x = (v + u) / n_levels``); the discrete log-likelihood of the integers ``v`` is then
    ``log_prob - D ln(n_levels)``, hence ``+ log2(n_levels)`` (``+8`` for 8-bit images).
    """
    return -log_prob / (n_dims * math.log(2)) + math.log2(n_levels)
