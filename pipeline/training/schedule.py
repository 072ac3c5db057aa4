"""Learning-rate schedules."""

from __future__ import annotations

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
