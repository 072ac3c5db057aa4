"""What a training run checks and logs at an epoch's end besides its own metrics: the spectral normalisation's
estimates against the exact norms, and (data-parallel) that every replica holds the same parameters."""

from __future__ import annotations

import logging

from torch import nn

from experiments.metric_logging import log_metrics
from pipeline.training.distributed import (
    DistributedContext,
    replica_deviation,
)
from pipeline.training.loop import EpochHook

OVERSHOOT_LAYERS_PER_EPOCH = 8  # layers whose training-forward norm is measured each epoch (rotating)


def chain_epoch_hooks(*hooks: EpochHook | None) -> EpochHook:
    """One ``on_epoch_end`` that calls each hook given (``None`` skipped), in order."""

    def call(epoch: int, metrics: dict[str, float]) -> None:
        for hook in hooks:
            if hook is not None:
                hook(epoch, metrics)

    return call


def log_spectral_estimates(model: nn.Module, epoch: int, step: int, prefix: str = "") -> None:
    """Log, at optimizer step ``step`` (the end of ``epoch``), every spectrally normalised layer's power-iteration
    estimate (``weights/sigma_bNNN_lK``: a section of its own in the MLflow UI), the largest, the steps the power
    iteration took, and the largest training-forward norm / c on a rotating sample of layers (the soft mode's
    overshoot)."""
    from pipeline.diagnostics import spectral_estimates, training_norm_ratios

    rows = spectral_estimates(model)
    if not rows:  # a vanilla network
        return
    sample = training_norm_ratios(
        model, max_layers=OVERSHOOT_LAYERS_PER_EPOCH, offset=epoch * OVERSHOOT_LAYERS_PER_EPOCH
    )
    metrics = {f"weights/sigma_b{r['block']:03d}_l{r['layer']}": r["sigma"] for r in rows}
    iterations = [r["power_iterations"] for r in rows]
    metrics |= {
        "lipschitz/sigma_max": max(r["sigma"] for r in rows),
        "lipschitz/power_iterations_mean": sum(iterations) / len(iterations),
        "lipschitz/power_iterations_max": max(iterations),
        "lipschitz/training_ratio_max": max(r["ratio"] for r in sample),
    }
    log_metrics({prefix + k: v for k, v in metrics.items()}, step)


def log_replica_consistency(model: nn.Module, ctx: DistributedContext, step: int, tolerance: float = 1e-4) -> None:
    """Under torchrun: check that every rank holds the same parameters and buffers (spectral state included)."""
    if not ctx.enabled:
        return
    deviation = replica_deviation(model, ctx)
    if ctx.is_main:
        log_metrics({"ddp/replica_max_deviation": deviation, "ddp/world_size": ctx.world_size}, step)
        if deviation > tolerance:
            logging.getLogger(type(model).__module__).warning(
                "replicas differ by up to %.3e across %d ranks", deviation, ctx.world_size
            )
