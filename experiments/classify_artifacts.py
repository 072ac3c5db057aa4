"""What a classify run logs once it has trained: the reconstruction error against the inverse's iterations
(Fig. 8), reconstructions, and the certified norm of every operator and block bound (Fig. 6)."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import mlflow
import torch

from experiments.metric_logging import log_metrics
from experiments.tracking import log_json, write_csv
from pipeline.data import ImageSplit
from pipeline.diagnostics import certified_lipschitz, layer_operator_norms, reconstruction_error_curve
from pipeline.models import (
    ResidualClassifier,
)
from pipeline.plotting import new_figure, save_figure, save_image_grid
from pipeline.transforms import InverseReport

RECONSTRUCTION_CURVE = "reconstruction_vs_iterations.csv"  # Fig. 8: iterations, rel_error_mean, ...


class ClassifyArtifactOptions(Protocol):
    """What the artifacts read of a classify run's config (:class:`experiments.classify.ClassifyConfig` has it)."""

    @property
    def model(self) -> str: ...
    @property
    def recon_images(self) -> int: ...
    @property
    def recon_iterations(self) -> tuple[int, ...]: ...
    def architecture_option(self, name: str) -> Any: ...


@torch.no_grad()
def measure_invertibility(
    model: ResidualClassifier, test: ImageSplit, prepare, mean, std, cfg: ClassifyArtifactOptions, step: int
) -> tuple[float, bool]:
    """Reconstruction error vs iterations (Fig. 8: a CSV and a figure, its x-axis not the run's step axis), grids
    (Figs. 3/7), layer norms (Fig. 6), throughput; metrics at ``step``. Returns the largest certified block bound and
    whether every block is certified invertible."""
    model.eval()
    x = prepare(test.images[: cfg.recon_images], train=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Fig. 8: error after exactly k iterations per block
        curve = reconstruction_error_curve(model, x, cfg.recon_iterations)
        write_csv(curve, out / RECONSTRUCTION_CURVE)
        fig, ax = new_figure()
        ax.semilogy([r["iterations"] for r in curve], [max(r["rel_error_mean"], 1e-16) for r in curve], marker="o")
        ax.set_xlabel("fixed-point iterations per block")
        ax.set_ylabel("relative reconstruction error")
        ax.set_title(f"{cfg.model}" + (f", c = {cfg.architecture_option('coeff')}" if cfg.model == "iresnet" else ""))
        ax.grid(alpha=0.3, which="both")
        save_figure(fig, out / "reconstruction_vs_iterations.png")
        # Figs. 3/7: originals over reconstructions at the default tolerance, and inversion throughput
        report = InverseReport()
        started = time.perf_counter()
        x_rec = model.reconstruct(model.features(x), report=report)
        seconds = time.perf_counter() - started
        denormalize = lambda t: t * std[:, None, None] + mean[:, None, None]  # noqa: E731
        rows = torch.cat([denormalize(x), denormalize(x_rec).nan_to_num(0.0)])
        save_image_grid(rows, out / "reconstructions.png", nrow=len(x))
        final_error = float(((x_rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max())
        log_metrics(
            {
                "inverse/recon_rel_error_max": final_error if math.isfinite(final_error) else 1e30,
                "inverse/images_per_second": len(x) / seconds,
                **{f"inverse/recon_{k}": v for k, v in report.summary().items()},
            },
            step,
        )
        bounds = _log_layer_norms(model, out, cfg, step)
        mlflow.log_artifacts(str(out))
    return bounds


def _log_layer_norms(
    model: ResidualClassifier, out: Path, cfg: ClassifyArtifactOptions, step: int
) -> tuple[float, bool]:
    """Fig. 6: the certified largest singular value of every operator, and the certified block bounds."""
    norms = layer_operator_norms(model)
    write_csv(norms, out / "layer_spectral_norms.csv")
    fig, ax = new_figure(7, 4)
    ax.plot(range(len(norms)), [r["norm"] for r in norms], marker=".", linestyle="none")
    ax.axhline(1.0, color="k", linewidth=0.8)
    if cfg.model == "iresnet":
        coeff = cfg.architecture_option("coeff")
        ax.axhline(coeff, color="r", linestyle="--", linewidth=0.8, label=f"c = {coeff}")
        ax.legend()
    ax.set_xlabel("layer")
    ax.set_ylabel("largest singular value (certified)")
    save_figure(fig, out / "layer_spectral_norms.png")
    bounds, certified = certified_lipschitz(model)
    log_json({"block_lipschitz_certified": bounds, "certified_invertible": certified}, "lipschitz.json")
    log_metrics(
        {
            "lipschitz/max_layer_norm": max(r["norm"] for r in norms),
            "lipschitz/max_block_certified": max(bounds),
            "lipschitz/certified_invertible": float(certified),
        },
        step,
    )
    mlflow.set_tag("certified_invertible", str(certified).lower())
    return max(bounds), certified
