"""Inverse speed: plain fixed point (Algorithm 1) vs Anderson acceleration, at several Lipschitz coefficients.

    python -m benchmarks.inverse                                  # c in {0.5, 0.7, 0.9, 0.97}, CPU, float64
    python -m benchmarks.inverse --model worst-case                # blocks whose Lip(g) = c is attained
    python -m benchmarks.inverse --device cuda --dtype float32 --json inverse.json

For each coefficient ``c``, ``--model flow`` builds a multi-scale flow (the ``quick`` architecture on
``--image``) with every layer's operator norm pushed to ``c`` (weights scaled up, then power iteration
to convergence); its three-layer ELU branches contract far more than their bound, so the plain
iteration is already fast there. ``--model worst-case`` stacks blocks ``g(x) = tanh(W x)`` with ``W``
symmetric and eigenvalues spread over ``[-c, c]``: ``Lip(g) = c`` is attained, the regime where the
plain iteration needs ``~ log(tol) / log(c)`` steps. Inputs are mapped to latents. Each method
inverts the latents with the loosest residual tolerance ``rtol`` (1e-6, 1e-7, ..., 1e-14) whose
reconstruction reaches ``--target-error`` (relative, default 1e-6): each block amplifies a residual
by up to ``1 / (1 - Lip(g))``, so near ``c = 1`` the whole flow needs tight tolerances. The table gives
that ``rtol``, the g evaluations summed over the blocks (each block's slowest sample), the wall time,
the relative error reached, and the ratios plain / Anderson.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from benchmarks.common import emit
from benchmarks.tables import markdown_table
from pipeline.distributions import DiagonalGaussian
from pipeline.layers import SpectralNormConv2d, SpectralNormLinear
from pipeline.layers.spectral import SpectralConfig
from pipeline.logging_setup import setup_logging
from pipeline.models import FlowModel, iresnet_flow
from pipeline.training.device import resolve_device
from pipeline.transforms import (
    FixedPointConfig,
    InverseReport,
    InvertibleResidualBlock,
    PowerSeriesLogDet,
    TransformSequence,
)

log = logging.getLogger("benchmarks.inverse")

RTOL_LADDER = [10.0**-k for k in range(6, 15)]  # residual tolerances tried, loosest first


class WorstCaseBranch(nn.Module):
    """``g(x) = tanh(W x)``, ``W`` symmetric with eigenvalues spread over ``[-c, c]``: ``Lip(g) = c``, attained at 0."""

    def __init__(self, dim: int, coeff: float) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        self.linear = SpectralNormLinear(dim, dim, spectral=SpectralConfig(coeff=coeff), bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(q @ torch.diag(torch.linspace(-1.0, 1.0, dim)) @ q.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class WorstCaseFlow(FlowModel):
    """``n_blocks`` residual blocks with :class:`WorstCaseBranch` on vectors of ``dim``."""

    def __init__(self, dim: int, n_blocks: int, coeff: float) -> None:
        super().__init__()
        self.input_shape = (dim,)
        self.flow = TransformSequence(*(InvertibleResidualBlock(WorstCaseBranch(dim, coeff)) for _ in range(n_blocks)))
        self.priors = nn.ModuleList([DiagonalGaussian((dim,), learnable=False)])

    def forward(self, x):
        z, logdet = self.flow(x)
        return [z], logdet

    def inverse(self, zs, *, report=None):
        return self.flow.inverse(zs[0], report=report)


def saturated_flow(coeff: float, image: tuple[int, int, int], blocks: tuple[int, ...], hidden: int, device, dtype):
    """A flow whose every spectrally normalised layer has operator norm ``coeff`` (to power-iteration accuracy)."""
    torch.manual_seed(0)
    flow = iresnet_flow("quick", input_shape=image, n_blocks=blocks, hidden_channels=hidden, coeff=coeff)
    flow = flow.to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(4.0)
        x = torch.rand(64, *image, device=device, dtype=dtype) - 0.5
        with flow.estimator(PowerSeriesLogDet(n_terms=1)):
            flow(x)  # ActNorm init, lazy spectral vectors
        for layer in flow.modules():
            if isinstance(layer, (SpectralNormLinear, SpectralNormConv2d)):
                layer.power_iteration(200)
                layer._refresh_sigma()
    return flow.eval()


def measure(flow, x: torch.Tensor, method: str, rtol: float, repeats: int) -> dict:
    with torch.no_grad(), flow.estimator(PowerSeriesLogDet(n_terms=1)):
        zs, _ = flow(x)
        for block in flow.residual_blocks():
            block.inverse_config = FixedPointConfig(atol=0.0, rtol=rtol, max_iterations=2000, method=method)
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(repeats):
            report = InverseReport()
            sync()
            start = time.perf_counter()
            x_rec = flow.inverse(zs, report=report)
            sync()
            times.append(time.perf_counter() - start)
    error = float(((x_rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max())
    return {
        "method": method,
        "g_evaluations": report.total_iterations,
        "max_block_iterations": max(report.iterations),
        "seconds": statistics.median(times),
        "relative_error": error,
        "converged": report.converged,
        "fallbacks": sum(report.n_fallback),
    }


def build(args: dict, coeff: float, device, dtype) -> tuple[FlowModel, torch.Tensor]:
    """The model to invert and the inputs (``--model flow`` or ``worst-case``)."""
    if args["model"] == "flow":
        image = tuple(args["image"])
        flow = saturated_flow(coeff, image, tuple(args["blocks"]), args["hidden"], device, dtype)
        shape = image
    else:
        torch.manual_seed(0)
        flow = WorstCaseFlow(args["dim"], sum(args["blocks"]), coeff).to(device=device, dtype=dtype)
        with torch.no_grad(), flow.estimator(PowerSeriesLogDet(n_terms=1)):
            flow(torch.zeros(1, args["dim"], device=device, dtype=dtype))
        flow.eval()
        shape = (args["dim"],)
    torch.manual_seed(1)
    x = torch.rand(args["batch"], *shape, device=device, dtype=dtype) - 0.5
    return flow, x


def run(args: dict) -> list[dict]:
    device = resolve_device(args["device"])
    dtype = getattr(torch, args["dtype"])
    rows = []
    for coeff in args["coeffs"]:
        flow, x = build(args, coeff, device, dtype)
        lips = flow.lipschitz_bounds(method="certified")
        for method in ("plain", "anderson"):
            # the loosest residual tolerance on the ladder whose reconstruction reaches the target error
            for rtol in RTOL_LADDER:
                row = measure(flow, x, method, rtol, 1)
                if row["relative_error"] <= args["target_error"]:
                    break
            row = {"coeff": coeff, "max_block_lipschitz": max(lips), "rtol": rtol, **measure(flow, x, method, rtol, 3)}
            row["met_target"] = row["relative_error"] <= args["target_error"]
            rows.append(row)
            log.info("c=%.2f %s: %d evaluations, %.3f s", coeff, method, row["g_evaluations"], row["seconds"])
    return rows


def markdown(rows_by_model: dict[str, list[dict]]) -> str:
    """g evaluations / seconds per c and method, one column pair per model (``flow``, ``worst-case``); a run that
    missed the target error says so."""
    by_model = {model: {(r["coeff"], r["method"]): r for r in rows} for model, rows in rows_by_model.items()}
    coeffs = sorted({c for rows in by_model.values() for c, _ in rows})
    header = ["c"] + [f"{model}: {method} evals / s" for model in by_model for method in ("plain", "anderson")]
    table = []
    for coeff in coeffs:
        cells = [f"{coeff:.2f}"]
        for rows in by_model.values():
            for method in ("plain", "anderson"):
                r = rows.get((coeff, method))
                cells.append(
                    ""
                    if r is None
                    else f"{r['g_evaluations']} / {r['seconds']:.3f}" + ("" if r["met_target"] else " (missed)")
                )
        table.append(cells)
    return markdown_table(header, table)


def format_table(rows: list[dict], model: str = "flow") -> str:
    return markdown({model: rows})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--model", default="flow", choices=["flow", "worst-case"])
    parser.add_argument("--dim", type=int, default=512, help="worst-case model: vector dimension")
    parser.add_argument("--coeffs", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.97])
    parser.add_argument("--image", type=int, nargs=3, default=[1, 28, 28])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 4])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--target-error", type=float, default=1e-6)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args(argv))
    if any(not 0 < c < 1 for c in args["coeffs"]):
        parser.error("every coefficient must satisfy 0 < c < 1")
    setup_logging()
    rows = run(args)
    emit(format_table(rows, args["model"]), args["json"], {"config": args, "results": rows})


if __name__ == "__main__":
    main()
