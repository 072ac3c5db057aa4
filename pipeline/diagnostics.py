"""Invertibility diagnostics for trained networks (paper Figs. 3, 6, 7, 8).

* :func:`reconstruction_error_curve`: error of inverting the feature map with exactly ``k``
  fixed-point iterations per block, for several ``k`` (Fig. 8).
* :func:`layer_operator_norms`: the certified largest singular value of every linear operator in
  every residual branch (Fig. 6).
* :func:`certified_lipschitz`: per-block certified ``Lip(g)`` and whether all are below one,
  i.e. whether the network is *certified* invertible.
* :func:`spectral_estimates`: every layer's power-iteration estimate and the steps it took.
* :func:`training_norm_ratios`: the norm a training forward applies, over ``c`` (the soft mode's overshoot).
* :func:`logdet_variance_report`: per-block spread of a stochastic log-det estimator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn

from pipeline.layers.branches import branch_linear_layers
from pipeline.layers.layer_norms import layer_operator_norm
from pipeline.transforms.residual import InvertibleResidualBlock, using_estimator


class FeatureInverse(Protocol):
    """A model with an invertible feature map (a :class:`~pipeline.models.ResidualClassifier`)."""

    def features(self, x: Tensor) -> Tensor: ...

    def reconstruct(self, features: Tensor) -> Tensor: ...

    def modules(self) -> Iterator[nn.Module]: ...


def _blocks(model: nn.Module | FeatureInverse) -> list[InvertibleResidualBlock]:
    return [m for m in model.modules() if isinstance(m, InvertibleResidualBlock)]


@torch.no_grad()
def reconstruction_error_curve(model: FeatureInverse, x: Tensor, iterations: Sequence[int]) -> list[dict[str, float]]:
    """Relative reconstruction error ``||x_rec - x|| / ||x||`` after exactly ``k`` iterations per block.

    ``model`` must have ``features(x)`` and ``reconstruct(features)`` (a classifier). Each block keeps
    its inverse method (plain or Anderson); its settings are restored afterwards.
    """
    blocks = _blocks(model)
    saved = [b.inverse_config for b in blocks]
    features = model.features(x)
    norm = x.flatten(1).norm(dim=1)
    rows = []
    try:
        for k in iterations:
            for b, cfg in zip(blocks, saved, strict=True):  # no early stop: exactly k iterations, same method
                b.inverse_config = replace(cfg, atol=1e-300, rtol=0.0, max_iterations=int(k), warn=False, strict=False)
            x_rec = model.reconstruct(features)
            rel = (x_rec - x).flatten(1).norm(dim=1) / norm
            rows.append(
                {
                    "iterations": int(k),
                    "rel_error_mean": float(rel.mean()),
                    "rel_error_max": float(rel.max()),
                    "abs_error_max": float((x_rec - x).abs().max()),
                }
            )
    finally:
        for b, cfg in zip(blocks, saved, strict=True):
            b.inverse_config = cfg
    return rows


def layer_operator_norms(model: nn.Module, *, method: str = "certified") -> list[dict]:
    """The operator norm of every linear layer of every residual branch (run the model once first)."""
    rows = []
    for i, block in enumerate(_blocks(model)):
        if block.input_shape is None:
            raise RuntimeError("run a forward pass first: layer input sizes are recorded on first use")
        input_hw = (block.input_shape[1], block.input_shape[2]) if len(block.input_shape) == 3 else None
        for j, layer in enumerate(branch_linear_layers(block.branch)):
            kernel = getattr(layer, "kernel_size", None)
            kernel = kernel[0] if isinstance(kernel, tuple) else kernel
            rows.append(
                {
                    "block": i,
                    "layer": j,
                    "kind": f"conv{kernel}x{kernel}" if kernel else "linear",
                    "spectral_normalized": not isinstance(layer, (nn.Conv2d, nn.Linear)),
                    "norm": layer_operator_norm(layer, method=method, input_hw=input_hw),
                }
            )
    return rows


def spectral_estimates(model: nn.Module) -> list[dict]:
    """The power-iteration state of every spectrally normalised layer of every residual branch.

    ``sigma`` is the running estimate of the raw weight's operator norm (a training forward applies
    ``W * min(1, c / sigma)``), ``power_iterations`` the steps its last training forward took.
    """
    from pipeline.layers.spectral import SPECTRAL_LAYERS

    rows = []
    for i, block in enumerate(_blocks(model)):
        for j, layer in enumerate(branch_linear_layers(block.branch)):
            if isinstance(layer, SPECTRAL_LAYERS):
                rows.append(
                    {
                        "block": i,
                        "layer": j,
                        "sigma": float(layer.sigma),
                        "coeff": layer.coeff,
                        "power_iterations": layer.last_power_iterations,
                    }
                )
    return rows


def training_norm_ratios(model: nn.Module, *, max_layers: int | None = None, offset: int = 0) -> list[dict]:
    """Applied norm / c of a training forward, per spectrally normalised layer (the soft mode's overshoot).

    The norm a training forward with each layer's current estimate applies to its current weight,
    measured against the exact (or converged Lanczos) norm, divided by ``c``: above 1 the soft
    constraint overshoots (strict mode: at most 1; eval mode never overshoots). Each layer costs an
    eval-time normalisation (reused by the next evaluation), so ``max_layers`` measures a sample,
    starting at layer ``offset`` (wrapping around): rotate the offset to cover every layer over time.
    """
    from pipeline.layers.spectral import spectral_layers

    layers = spectral_layers(model)
    if not layers:
        return []
    n = len(layers) if max_layers is None else min(max_layers, len(layers))
    chosen = [(offset + k) % len(layers) for k in range(n)]
    return [{"layer": i, "coeff": layers[i].coeff, "ratio": layers[i].training_norm_ratio()} for i in chosen]


def certified_lipschitz(model: nn.Module) -> tuple[list[float], bool]:
    """Per-block certified ``Lip(g)`` (eval mode) and whether every one is below 1."""
    bounds = [b.lipschitz_bound(method="certified") for b in _blocks(model)]
    return bounds, all(bound < 1.0 for bound in bounds)


@torch.no_grad()
def logdet_estimator_study(
    flow: nn.Module, x: Tensor, terms: Sequence[int], *, n_probes: int = 64, n_levels: int = 256
) -> list[dict[str, float]]:
    """Bias and standard deviation of the power-series log-det against the exact one (Figs. 4/9).

    For each number of terms: ``bias`` is the mean over images of (average of ``n_probes``
    single-probe estimates - exact), ``std`` the spread of single-probe estimates, both of the
    whole flow's log-det and in bits/dim; ``bias_stderr`` is the bias's Monte-Carlo standard error.
    """
    from pipeline.transforms.logdet import ExactLogDet, PowerSeriesLogDet

    flow.eval()
    dim = x[0].numel()
    per_bit = 1.0 / (dim * math.log(2))
    with using_estimator(flow, ExactLogDet(max_dim=dim)):
        exact = torch.stack([flow(xi[None])[1][0] for xi in x])
    rows = []
    for n in terms:
        with using_estimator(flow, PowerSeriesLogDet(n_terms=int(n))):
            estimates = torch.stack([flow(xi[None].expand(n_probes, *xi.shape))[1] for xi in x])  # (images, probes)
        error = estimates - exact[:, None]
        bias = error.mean(dim=1)
        rows.append(
            {
                "n_terms": int(n),
                "bias_bits_per_dim": float(bias.mean()) * per_bit,
                "abs_bias_bits_per_dim": float(bias.abs().mean()) * per_bit,
                "bias_stderr_bits_per_dim": float(error.std(dim=1).mean() / math.sqrt(n_probes)) * per_bit,
                "std_bits_per_dim": float(estimates.std(dim=1).mean()) * per_bit,
            }
        )
    return rows


@torch.no_grad()
def residual_block_inputs(flow: nn.Module, x: Tensor) -> list[Tensor]:
    """The input of every residual block of ``flow`` on ``x`` (eval mode; one cheap pass, 1-term series)."""
    from pipeline.transforms.logdet import PowerSeriesLogDet

    inputs: list[Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for b in _blocks(flow)]
    was_training = flow.training
    flow.eval()
    try:
        with using_estimator(flow, PowerSeriesLogDet(n_terms=1)):
            flow(x)
    finally:
        for h in hooks:
            h.remove()
        flow.train(was_training)
    return inputs


@torch.no_grad()
def logdet_variance_report(flow: nn.Module, x: Tensor, estimator, *, n_repeats: int = 16) -> list[dict]:
    """Per-block spread of a stochastic log-det estimator at fixed inputs (variance control).

    For each residual block, ``n_repeats`` independent calls of ``estimator`` (fresh probes and, for
    the Russian roulette, fresh series lengths) on the block's real input: the mean estimate, its
    standard deviation per image (averaged over the images), in nats and in bits per dimension of the
    whole input, and the estimator's expected vector-Jacobian products. Blocks draw independently, so
    the flow's total variance is the sum (see :func:`total_logdet_std_bits_per_dim`).
    """
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2 to measure a spread, got {n_repeats}")
    was_training = flow.training
    flow.eval()
    per_bit = 1.0 / (x[0].numel() * math.log(2))
    rows = []
    try:
        for i, (block, inp) in enumerate(zip(_blocks(flow), residual_block_inputs(flow, x), strict=True)):
            draws = torch.stack([estimator(block.branch, inp)[1] for _ in range(n_repeats)]).double()  # (R, B)
            std = float(draws.std(dim=0).mean())
            rows.append(
                {
                    "block": i,
                    "input_dim": inp[0].numel(),
                    "mean_logdet_nats": float(draws.mean()),
                    "std_nats": std,
                    "std_bits_per_dim": std * per_bit,
                    "expected_vjps": estimator.expected_vjps(),
                }
            )
    finally:
        flow.train(was_training)
    return rows


def total_logdet_std_bits_per_dim(rows: list[dict]) -> float:
    """Standard deviation of the whole flow's log-det estimate (independent blocks), in bits/dim."""
    return math.sqrt(sum(r["std_bits_per_dim"] ** 2 for r in rows))
