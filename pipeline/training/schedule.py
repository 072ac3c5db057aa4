"""Learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """Factor for ``LambdaLR``: ``(step + 1) / warmup_steps`` up to 1, never above (no overshoot).

    The reference code's warm-up overshot the target learning rate; here the factor is capped.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def step_decay(milestones: tuple[int, ...], gamma: float) -> Callable[[int], float]:
    """Factor ``gamma ** (number of milestones passed)``, for epoch-indexed schedules."""

    def factor(epoch: int) -> float:
        return gamma ** sum(epoch >= m for m in milestones)

    return factor


LR_SCHEDULES = ("constant", "cosine")


def cosine_factor(progress: float, final_fraction: float = 0.0) -> float:
    """Cosine decay from 1 at ``progress = 0`` to ``final_fraction`` at ``progress >= 1``."""
    progress = min(max(progress, 0.0), 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_then(
    schedule: str, warmup_steps: int, total_steps: int, final_fraction: float = 0.0
) -> Callable[[int], float]:
    """Factor for ``LambdaLR``: linear warm-up, then ``constant`` or ``cosine`` decay over ``total_steps``.

    A short training (the main job's minutes) ends at a low learning rate instead of stopping while
    the loss still oscillates at the peak rate; ``final_fraction`` is the rate's floor.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}")
    warmup = linear_warmup(warmup_steps)
    if schedule == "constant":
        return warmup
    if total_steps < 1:
        raise ValueError(f"a cosine schedule needs total_steps >= 1, got {total_steps}")

    def factor(step: int) -> float:
        return warmup(step) * cosine_factor(step / total_steps, final_fraction)

    return factor
