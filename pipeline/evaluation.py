"""Honest bits/dim: the paper's protocol (App. C.3), or an unbiased one where that is cheaper.

Two log-det estimators, both with every block's *certified* Lipschitz bound ``L``:

* ``power_series`` (the paper): the number of terms from Theorem 3, so the truncation bias is below
  ``bias_tol`` bits/dim. Theorem 3 is a worst case: at ``L = 0.9`` it asks 86 terms, at 0.97 about 300.
* ``russian_roulette``: ``roulette_exact_terms`` terms, then a geometric number more, each weighted by
  ``1 / P(reached)``: unbiased, so no bias bound is needed. ``p = (1 - L^2) / 2`` keeps the variance
  finite with a margin (the weighted terms shrink like ``(2 L^2 / (1 + L^2))^k``).

``estimator="auto"`` takes the roulette when its expected cost per pass is under half the series' (the
roulette needs more passes for the same standard error). One roulette draw is shared by the images of a
call, so the roulette evaluates chunks of ``roulette_batch`` images: a pass averages many draws. Passes
of the split are averaged (same dequantisation noise, fresh probes and draws) until the standard error is
below ``se_tol`` bits/dim.

The standard error is that of the test-set mean over ``P`` passes. The images of one call (a *chunk*)
share their roulette draw, so their errors are correlated; different chunks and passes draw afresh, so
chunk errors are independent. Hence ``SE^2 = sum_b w_b^2 s_b^2 / P``, with ``s_b^2`` the variance over
passes of chunk ``b``'s mean and ``w_b`` its share of the images: unbiased from two passes on, with
about as many degrees of freedom as there are chunks (20 for 1,000 images in chunks of 50), where the
spread of ``P`` pass means has only ``P - 1``. The result reports the estimate, its standard error,
the bias bound (0 for the roulette), the estimator and whether the tolerances were met (``max_passes``
caps the cost).
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
from pipeline.training.distributed import SINGLE_PROCESS, DistributedContext, sum_over_ranks
from pipeline.transforms.logdet import LogDetEstimator, PowerSeriesLogDet, RussianRouletteLogDet
from pipeline.transforms.residual import using_estimator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalProtocol:
    bias_tol: float = 1e-4  # bits/dim, Theorem 3 bound on the truncation bias
    se_tol: float = 1e-3  # bits/dim, standard error of the Hutchinson average
    min_passes: int = 2  # the spread over passes of each chunk's mean needs two
    max_passes: int = 20
    max_terms: int = 100  # cap of the power series (its bias bound is reported honestly when hit)
    estimator: str = "auto"  # "power_series" (Theorem 3), "russian_roulette" (unbiased) or the cheaper
    roulette_exact_terms: int = 4
    # images sharing one roulette draw: smaller chunks give more draws per pass (a smaller standard error) but
    # use threads worse. Measured on the quick flow, 2 threads, 2 passes of 1,000 images: 25 -> se 0.0029 for
    # 36 CPU-s, 50 -> 0.0034 for 22 CPU-s, 125 -> 0.0087 for 18 CPU-s
    roulette_batch: int = 50

    def __post_init__(self) -> None:
        if self.bias_tol <= 0 or self.se_tol <= 0:
            raise ValueError("bias_tol and se_tol must be > 0")
        if not 2 <= self.min_passes <= self.max_passes:
            raise ValueError(f"need 2 <= min_passes <= max_passes, got {self.min_passes}, {self.max_passes}")
        if self.estimator not in EVAL_ESTIMATORS:
            raise ValueError(f"unknown evaluation estimator {self.estimator!r}; choose one of {EVAL_ESTIMATORS}")
        if self.max_terms < 1 or self.roulette_exact_terms < 0 or self.roulette_batch < 1:
            raise ValueError("max_terms and roulette_batch must be >= 1, roulette_exact_terms >= 0")

    def choose_estimator(self, lips: list[float], dims: list[int], total_dim: int) -> tuple[LogDetEstimator, float]:
        """The log-det estimator for blocks with certified bounds ``lips`` and its bias bound (bits/dim)."""
        if max(lips) >= 1:
            raise ValueError(
                f"a block's certified Lipschitz bound is {max(lips):.4f} >= 1: the series does not converge"
            )
        try:
            n_terms = choose_n_terms(lips, dims, total_dim, tol_bits_per_dim=self.bias_tol, max_terms=self.max_terms)
        except ValueError:
            n_terms = None  # Theorem 3 needs more terms than the cap
        roulette = RussianRouletteLogDet(
            n_exact_terms=self.roulette_exact_terms, p=(1.0 - max(lips) ** 2) / 2, gradient="backprop"
        )
        use_roulette = self.estimator == "russian_roulette" or (
            self.estimator == "auto" and (n_terms is None or roulette.expected_vjps() < n_terms / 2)
        )
        if use_roulette:
            return roulette, 0.0
        if n_terms is None:  # power series forced beyond the cap: cap the cost, report the larger bias honestly
            n_terms = self.max_terms
            log.warning(
                "Theorem 3 needs more than %d terms (max block Lipschitz bound %.4f); using %d",
                self.max_terms,
                max(lips),
                n_terms,
            )
        return PowerSeriesLogDet(n_terms=n_terms), flow_bias_bound_bits_per_dim(lips, dims, n_terms, total_dim)


EVAL_ESTIMATORS = ("auto", "power_series", "russian_roulette")


# BitsPerDimEstimate's fields as metric names, with their units
METRIC_NAMES = {
    "bpd": "bpd",
    "standard_error": "standard_error_bpd",
    "bias_bound": "bias_bound_bpd",
    "n_terms": "series_terms",
    "n_passes": "passes",
    "n_images": "images",
    "max_block_lipschitz": "max_block_lipschitz",
    "converged": "converged",
    "unbiased": "unbiased",
}


@dataclass(frozen=True)
class BitsPerDimEstimate:
    bpd: float
    standard_error: float
    bias_bound: float
    n_terms: float  # series terms per pass (expected, for the roulette)
    n_passes: int
    n_images: int
    max_block_lipschitz: float
    converged: bool  # both tolerances met
    unbiased: bool  # the Russian-roulette estimator (bias 0); else the Theorem-3 power series

    def metrics(self, split: str) -> dict[str, float]:
        """The estimate as metrics of ``split`` (``test``, ``val``), named with their units: ``test/bpd``,
        ``test/standard_error_bpd``, ``test/bias_bound_bpd``, ``test/series_terms``, ``test/passes``, ``test/images``,
        ``test/max_block_lipschitz``, ``test/converged`` and ``test/unbiased`` (1 or 0)."""
        return {f"{split}/{METRIC_NAMES[k]}": float(v) for k, v in asdict(self).items()}

    @property
    def estimator(self) -> str:
        return "russian_roulette" if self.unbiased else "power_series"


def chunked_standard_error(chunk_means: torch.Tensor, chunk_sizes: list[int]) -> float:
    """Standard error of the mean over passes and images, from ``chunk_means`` of shape ``(passes, chunks)``.

    Chunk errors are independent (each chunk draws its own probes and roulette draw), so the variance of
    the image-weighted mean is ``sum_b w_b^2 Var(chunk b) / P``, each ``Var`` estimated over the passes.
    """
    n_passes = chunk_means.shape[0]
    if n_passes < 2:
        raise ValueError("a standard error over passes needs at least two passes")
    weights = torch.tensor(chunk_sizes, dtype=torch.float64) / sum(chunk_sizes)
    variance = (weights**2 * chunk_means.double().var(dim=0)).sum() / n_passes
    return math.sqrt(float(variance))


@torch.no_grad()
def evaluate_bits_per_dim(
    model: FlowModel,
    split: ImageSplit,
    *,
    n_levels: int,
    pad: int = 0,
    repeat_channels: int = 1,
    batch_size: int = 256,
    protocol: EvalProtocol = EvalProtocol(),
    seed: int = 1234,
    progress: bool = True,
    ctx: DistributedContext = SINGLE_PROCESS,
) -> BitsPerDimEstimate:
    """Test bits/dim of ``model`` on ``split`` by the paper's protocol (see module docstring).

    Every chunk of every pass draws its noise (probes, roulette lengths) from a seed of its own, ``(seed, pass,
    chunk)``: the result does not depend on the order of the chunks, so under torchrun (``ctx``, every rank calling)
    each rank evaluates every ``world_size``-th chunk, one all-reduce per pass gathers them, and every rank returns
    the value a single process computes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lips = model.lipschitz_bounds(method="certified")
    estimator, bias = protocol.choose_estimator(lips, model.block_dims(), model.dim)

    # forked RNG: evaluation is reproducible and leaves the training random stream untouched
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inputs = [
            dequantize(pad_images(images.to(device), pad, repeat_channels), n_levels)
            for images, _ in iterate_batches(split, batch_size, shuffle=False)
        ]
        # one roulette draw is shared by the images of a call: draw per small chunk, so a pass averages
        # many independent draws (the series' calls are unaffected)
        chunk = protocol.roulette_batch if isinstance(estimator, RussianRouletteLogDet) else batch_size
        chunks = [part for x in inputs for part in x.split(chunk)]
        passes: list[torch.Tensor] = []  # per pass: each chunk's mean bits/dim
        se = math.inf
        bar = tqdm(total=protocol.max_passes, desc="eval bits/dim", disable=None if progress else True, leave=False)
        mine = range(ctx.rank, len(chunks), ctx.world_size)
        while len(passes) < protocol.max_passes:
            means = torch.zeros(len(chunks), dtype=torch.float64, device=device)
            with using_estimator(model, estimator):
                for i in mine:
                    torch.manual_seed(seed + 1_000_003 * (len(passes) * len(chunks) + i + 1))
                    means[i] = bits_per_dim(model.log_prob(chunks[i]), model.dim, n_levels).mean()
            means = sum_over_ranks(means, ctx)  # every rank's chunks (each chunk is computed by one rank)
            if not torch.isfinite(means).all():
                raise FloatingPointError("non-finite log-likelihood during evaluation")
            passes.append(means.double().cpu())
            bar.update(1)
            if len(passes) >= protocol.min_passes:
                se = chunked_standard_error(torch.stack(passes), [len(part) for part in chunks])
                bar.set_postfix(se=f"{se:.2e}")
                if se < protocol.se_tol:
                    break
        bar.close()
    stacked = torch.stack(passes)
    weights = torch.tensor([len(part) for part in chunks], dtype=torch.float64) / sum(len(p) for p in chunks)
    converged = se < protocol.se_tol and bias < protocol.bias_tol
    if not converged:
        log.warning(
            "bits/dim standard error %.2e did not reach %.1e within %d passes", se, protocol.se_tol, protocol.max_passes
        )
    model.train(was_training)
    return BitsPerDimEstimate(
        bpd=float((stacked.mean(dim=0) * weights).sum()),
        standard_error=se,
        bias_bound=bias,
        n_terms=estimator.expected_vjps(),
        n_passes=stacked.shape[0],
        n_images=sum(len(part) for part in chunks),
        max_block_lipschitz=max(lips),
        converged=converged,
        unbiased=isinstance(estimator, RussianRouletteLogDet),
    )


def bits_per_dim_per_image(
    model: FlowModel,
    images: torch.Tensor,
    *,
    n_levels: int,
    pad: int = 0,
    repeat_channels: int = 1,
    passes: int = 8,
    protocol: EvalProtocol = EvalProtocol(),
    seed: int = 1234,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's bits/dim and its standard error (float64, on the CPU), for uint8 ``images`` (N, C, H, W).

    The estimator is the protocol's, from the blocks' certified bounds (the unbiased roulette, or the Theorem-3
    series with its bias bound); each image is dequantised once and its log-density averaged over ``passes``
    draws of the probes, the standard error being that of the mean over the passes. Reproducible from ``seed``
    (a forked RNG; the caller's random stream is left as it was): the same images give the same numbers.
    """
    if passes < 2:
        raise ValueError(f"passes must be >= 2 (a standard error needs two), got {passes}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    estimator, _ = protocol.choose_estimator(model.lipschitz_bounds(method="certified"), model.block_dims(), model.dim)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x = dequantize(pad_images(images.to(device), pad, repeat_channels), n_levels)
        values = []
        with using_estimator(model, estimator):
            for p in range(passes):
                torch.manual_seed(seed + 1_000_003 * (p + 1))
                parts = x.split(protocol.roulette_batch)
                bpd = torch.cat([bits_per_dim(model.log_prob(v), model.dim, n_levels) for v in parts])
                values.append(bpd.detach().double())
    model.train(was_training)
    stacked = torch.stack(values)
    return stacked.mean(dim=0).cpu(), (stacked.std(dim=0) / math.sqrt(passes)).cpu()


@torch.no_grad()
def diagonal_gaussian_baseline_bits_per_dim(
    train: ImageSplit, test: ImageSplit, *, n_levels: int, pad: int = 0, repeat_channels: int = 1, seed: int = 1234
) -> float:
    """Test bits/dim of the maximum-likelihood diagonal Gaussian (a learned-prior, ActNorm-only flow).

    Fitted in closed form to dequantised training images (per-dimension mean and variance) and
    evaluated exactly on dequantised test images: the reference point any flow must beat.
    """
    generator = torch.Generator().manual_seed(seed)
    x_train = dequantize(pad_images(train.images, pad, repeat_channels), n_levels, generator=generator)
    x_test = dequantize(pad_images(test.images, pad, repeat_channels), n_levels, generator=generator)
    x_train, x_test = x_train.double().flatten(1), x_test.double().flatten(1)
    mean, var = x_train.mean(dim=0), x_train.var(dim=0, unbiased=False)
    log_prob = (-0.5 * ((x_test - mean) ** 2 / var + torch.log(2 * math.pi * var))).sum(dim=1)
    return float(bits_per_dim(log_prob, x_test.shape[1], n_levels).mean())
