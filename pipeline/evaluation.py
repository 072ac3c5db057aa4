"""The paper's evaluation protocol for bits/dim (App. C.3).

1. Choose the number of power-series terms from Theorem 3 with each block's *certified*
   Lipschitz bound, so the truncation bias is below ``bias_tol`` bits/dim.
2. Average Hutchinson estimates over repeated passes of the test set (same dequantisation noise,
   fresh probes) until the standard error of the Hutchinson noise is below ``se_tol`` bits/dim.

The standard error is that of the test-set mean: ``sqrt(sum_i s_i^2 / P) / N`` with ``s_i^2`` the
across-pass variance of image ``i`` and ``P`` passes. The result reports the estimate, its
standard error, the bias bound and whether the tolerances were met (``max_passes`` caps the cost).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from pipeline.bounds import choose_n_terms, flow_bias_bound_bits_per_dim
from pipeline.data.preprocessing import dequantize, iterate_batches, pad_images
from pipeline.data.registry import ImageSplit
from pipeline.metrics import bits_per_dim
from pipeline.models.base import FlowModel
from pipeline.transforms.logdet import PowerSeriesLogDet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalProtocol:
    bias_tol: float = 1e-4  # bits/dim, Theorem 3 bound on the truncation bias
    se_tol: float = 1e-3  # bits/dim, standard error of the Hutchinson average
    min_passes: int = 2  # at least two passes to estimate the variance at all
    max_passes: int = 20
    max_terms: int = 100

    def __post_init__(self) -> None:
        if self.bias_tol <= 0 or self.se_tol <= 0:
            raise ValueError("bias_tol and se_tol must be > 0")
        if not 2 <= self.min_passes <= self.max_passes:
            raise ValueError(f"need 2 <= min_passes <= max_passes, got {self.min_passes}, {self.max_passes}")


@dataclass(frozen=True)
class BitsPerDimEstimate:
    bpd: float
    standard_error: float
    bias_bound: float
    n_terms: int
    n_passes: int
    n_images: int
    max_block_lipschitz: float
    converged: bool  # both tolerances met

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": float(v) for k, v in asdict(self).items()}


@torch.no_grad()
def evaluate_bits_per_dim(
    model: FlowModel,
    split: ImageSplit,
    *,
    n_levels: int,
    pad: int = 0,
    batch_size: int = 256,
    protocol: EvalProtocol = EvalProtocol(),
    seed: int = 1234,
    progress: bool = True,
) -> BitsPerDimEstimate:
    """Test bits/dim of ``model`` on ``split`` by the paper's protocol (see module docstring)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lips = model.lipschitz_bounds(method="certified")
    dims = model.block_dims()
    if max(lips) >= 1:
        raise ValueError(f"a block's certified Lipschitz bound is {max(lips):.4f} >= 1: the series does not converge")
    try:
        n_terms = choose_n_terms(
            lips, dims, model.dim, tol_bits_per_dim=protocol.bias_tol, max_terms=protocol.max_terms
        )
    except ValueError:
        # Lip(g) close to 1: cap the cost, and report the larger bias bound honestly
        n_terms = protocol.max_terms
        log.warning(
            "Theorem 3 needs more than %d terms (max block Lipschitz bound %.4f); using %d",
            protocol.max_terms,
            max(lips),
            n_terms,
        )
    bias = flow_bias_bound_bits_per_dim(lips, dims, n_terms, model.dim)
    estimator = PowerSeriesLogDet(n_terms=n_terms)

    # forked RNG: evaluation is reproducible and leaves the training random stream untouched
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inputs = [
            dequantize(pad_images(images.to(device), pad), n_levels)
            for images, _ in iterate_batches(split, batch_size, shuffle=False)
        ]
        passes: list[torch.Tensor] = []
        se = math.inf
        bar = tqdm(total=protocol.max_passes, desc="eval bits/dim", disable=None if progress else True, leave=False)
        while len(passes) < protocol.max_passes:
            per_image = torch.cat(
                [bits_per_dim(model.log_prob(x, estimator=estimator), model.dim, n_levels) for x in inputs]
            )
            if not torch.isfinite(per_image).all():
                raise FloatingPointError("non-finite log-likelihood during evaluation")
            passes.append(per_image.double().cpu())
            bar.update(1)
            if len(passes) >= protocol.min_passes:
                stacked = torch.stack(passes)
                p, n = stacked.shape
                se = math.sqrt(float(stacked.var(dim=0, unbiased=True).sum()) / p) / n
                bar.set_postfix(se=f"{se:.2e}")
                if se < protocol.se_tol:
                    break
        bar.close()
    stacked = torch.stack(passes)
    converged = se < protocol.se_tol and bias < protocol.bias_tol
    if not converged:
        log.warning(
            "bits/dim standard error %.2e did not reach %.1e within %d passes", se, protocol.se_tol, protocol.max_passes
        )
    model.train(was_training)
    return BitsPerDimEstimate(
        bpd=float(stacked.mean()),
        standard_error=se,
        bias_bound=bias,
        n_terms=n_terms,
        n_passes=stacked.shape[0],
        n_images=stacked.shape[1],
        max_block_lipschitz=max(lips),
        converged=converged,
    )


@torch.no_grad()
def diagonal_gaussian_baseline_bits_per_dim(
    train: ImageSplit, test: ImageSplit, *, n_levels: int, pad: int = 0, seed: int = 1234
) -> float:
    """Test bits/dim of the maximum-likelihood diagonal Gaussian (a learned-prior, ActNorm-only flow).

    Fitted in closed form to dequantised training images (per-dimension mean and variance) and
    evaluated exactly on dequantised test images: the reference point any flow must beat.
    """
    generator = torch.Generator().manual_seed(seed)
    x_train = dequantize(pad_images(train.images, pad), n_levels, generator=generator).double().flatten(1)
    x_test = dequantize(pad_images(test.images, pad), n_levels, generator=generator).double().flatten(1)
    mean, var = x_train.mean(dim=0), x_train.var(dim=0, unbiased=False)
    log_prob = (-0.5 * ((x_test - mean) ** 2 / var + torch.log(2 * math.pi * var))).sum(dim=1)
    return float(bits_per_dim(log_prob, x_test.shape[1], n_levels).mean())
