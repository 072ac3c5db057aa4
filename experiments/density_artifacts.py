"""What a density run logs once it has trained: samples, reconstructions and their inverses' metrics, the bits/dim
curves, the certified and estimated Lipschitz bounds, the training log-det's noise per block, then the model."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import mlflow
import torch
from torch import Tensor

from experiments.metric_logging import log_metrics
from experiments.models import log_pyfunc_model
from experiments.tracking import log_json, write_csv
from pipeline.data import ImageSplit
from pipeline.diagnostics import logdet_variance_report, total_logdet_std_bits_per_dim
from pipeline.models import IResNetFlow
from pipeline.plotting import new_figure, save_figure, save_image_grid
from pipeline.transforms import InverseReport, LogDetEstimator


def _log_history_figure(run_id: str, out: Path, step: int, results: Mapping[str, float]) -> None:
    """The bits/dim curves against the optimizer step; ``results`` (the model's, not logged yet) end the test curve."""
    client = mlflow.tracking.MlflowClient()
    fig, ax = new_figure()
    for key, label in (("train/bpd", "train (per step)"), ("test/bpd", "test"), ("val/bpd", "validation")):
        history = sorted(((m.step, m.value) for m in client.get_metric_history(run_id, key)), key=lambda m: m[0])
        if key in results:
            history.append((step, results[key]))
        if history:  # every series is logged against the optimizer step
            ax.plot(
                [m[0] for m in history],
                [m[1] for m in history],
                marker="o" if key != "train/bpd" else None,
                label=label,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits/dim")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out)


class DensityArtifactOptions(Protocol):
    """What the artifacts read of a density run's config (:class:`experiments.density.DensityConfig` has it)."""

    @property
    def pad(self) -> int: ...
    @property
    def repeat_channels(self) -> int: ...
    @property
    def dataset(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def sample_temperature(self) -> float: ...
    @property
    def variance_repeats(self) -> int: ...
    @property
    def register_model(self) -> str | None: ...
    def training_estimator(self) -> LogDetEstimator: ...


@torch.no_grad()
def log_final_artifacts(
    model: IResNetFlow,
    test: ImageSplit,
    n_levels: int,
    prepare,
    cfg: DensityArtifactOptions,
    run_id: str,
    step: int,
    results: Mapping[str, float],
) -> float:
    """Samples, reconstructions, figures and diagnostics at ``step``, then the model with its ``results``; returns
    the largest certified Lipschitz bound of a block."""
    model.eval()
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.seed)
        out = Path(tmp)
        x = _log_samples_and_reconstructions(model, prepare(test.images[: cfg.n_samples]), cfg, out, step)
        _log_history_figure(run_id, out / "history.png", step, results)
        lips = model.lipschitz_bounds(method="certified")
        log_json(
            {"certified_lipschitz": lips, "estimated_lipschitz": model.lipschitz_bounds(method="estimate")},
            "lipschitz.json",
        )
        log_metrics({"lipschitz/max_block_certified": max(lips)}, step)
        if cfg.variance_repeats:  # how noisy the training log-det is, block by block
            rows = logdet_variance_report(model, x[:16], cfg.training_estimator(), n_repeats=cfg.variance_repeats)
            write_csv(rows, out / "logdet_variance.csv")
            log_metrics(
                {
                    "train/logdet_std_bpd": total_logdet_std_bits_per_dim(rows),
                    "train/logdet_std_bpd_max_block": max(r["std_bits_per_dim"] for r in rows),
                },
                step,
            )
        mlflow.log_artifacts(str(out))
    log_pyfunc_model(
        model,
        "density",
        {"n_levels": n_levels, "pad": cfg.pad, "repeat_channels": cfg.repeat_channels, "dataset": cfg.dataset},
        test.images[:2].numpy(),
        register_as=cfg.register_model,
        step=step,
        results=results,
    )
    return max(lips)


def _log_samples_and_reconstructions(
    model: IResNetFlow, x: Tensor, cfg: DensityArtifactOptions, out: Path, step: int
) -> Tensor:
    """Samples at the configured temperature and the reconstructions of the encoded test images ``x``, as images
    in ``out`` and their inverses' metrics; returns ``x``."""
    crop = (slice(None), slice(None), slice(cfg.pad, -cfg.pad or None), slice(cfg.pad, -cfg.pad or None))
    report = InverseReport()
    samples = model.sample(cfg.n_samples, temperature=cfg.sample_temperature, report=report)
    save_image_grid(samples[crop] + 0.5, out / f"samples_T{cfg.sample_temperature:g}.png")
    log_metrics({f"inverse/sample_{k}": v for k, v in report.summary().items()}, step)
    # reconstruction of encoded test images
    zs, _ = model(x)
    report = InverseReport()
    x_rec = model.inverse(zs, report=report)
    error = (x_rec - x).abs().flatten(1).max(dim=1).values
    log_metrics(
        {
            "inverse/recon_max_abs_error": float(error.max()),
            "inverse/recon_mean_abs_error": float(error.mean()),
            **{f"inverse/recon_{k}": v for k, v in report.summary().items()},
        },
        step,
    )
    pairs = torch.stack([x[:32], x_rec[:32]], dim=1).flatten(0, 1)
    save_image_grid(pairs[crop] + 0.5, out / "reconstructions.png")
    return x
