"""``mlflow run . -e density``: train and evaluate the i-ResNet flow, tracked in MLflow.

    python -m experiments.density --preset quick
    python -m experiments.density --preset paper-cifar10 --data-dir ~/data --device cuda
    python -m experiments.density --resume <run_id>        # continue from the last epoch
    torchrun --nproc_per_node 8 -m experiments.density --preset paper-cifar10 --data-dir ~/data   # 8 GPUs

Every option left unset takes the preset's value.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import torch

from experiments import cli
from experiments.tracking import PROJECT_ROOT, log_json, log_metrics, log_model, write_csv
from pipeline.data import (
    DATASETS,
    ImageSplit,
    dequantize,
    epoch_batches,
    load_dataset,
    pad_images,
)
from pipeline.diagnostics import logdet_variance_report, total_logdet_std_bits_per_dim
from pipeline.evaluation import EvalProtocol, diagonal_gaussian_baseline_bits_per_dim, evaluate_bits_per_dim
from pipeline.metrics import bits_per_dim
from pipeline.models import FlowArchitecture, IResNetFlow
from pipeline.models.base import n_parameters
from pipeline.plotting import new_figure, save_figure, save_image_grid
from pipeline.training.device import check_device_name
from pipeline.training.distributed import (
    DistributedContext,
    check_global_batch,
    distributed_session,
    shard_batches,
    wrap_model,
)
from pipeline.training.loop import EpochHook, LoopConfig, fit
from pipeline.training.schedule import warmup_then
from pipeline.transforms import InverseReport

log = logging.getLogger("experiments.density")


@dataclass(frozen=True)
class DensityConfig(cli.EstimatorOptions, cli.InverseOptions):
    """Everything a density run needs; validated in one place (``__post_init__``).

    The training log-det estimator's options (``estimator``, ``n_terms``, ``gradient``, ...) come from
    :class:`experiments.cli.EstimatorOptions`, the inverse's (``inverse_tol``, ``inverse_method``) from
    :class:`experiments.cli.InverseOptions`.
    """

    preset: str = "quick"
    # data
    dataset: str = "digits-mnist5k"
    data_dir: str | None = None
    download: bool = False
    pad: int = 0
    validation_fraction: float = 0.0  # > 0: evaluate on a held-out part of train (sweeps), test at the end
    # model
    n_blocks: tuple[int, ...] = (4, 4)
    hidden_channels: tuple[int, ...] = (32,)  # one width for every level, or one per level
    coeff: float = 0.9
    n_power_iterations: int = 5
    power_tol: float = 0.0  # > 0: each step's power iteration runs to this relative change of sigma
    lipschitz: str = "soft"  # "strict": every training forward applies norms <= c (certified bound per step)
    activation: str = "elu"
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    lr_schedule: str = "constant"  # or "cosine": decay to lr * lr_final_fraction at the last step
    lr_final_fraction: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads of this process; 0: the cores divided among the local workers
    deterministic: bool = False  # deterministic kernels (GPU): a resumed run then equals an uninterrupted one
    amp: bool = False
    # evaluation
    eval_every: int = 5
    eval_batch_size: int = 250
    eval_max_images: int = 0  # 0: the whole split
    eval_subset: int = 200  # images of the evaluations before the last epoch (cheap; 0: as the last)
    bias_tol: float = 1e-4
    se_tol: float = 1e-3
    max_passes: int = 20
    n_samples: int = 64
    sample_temperature: float = 1.0
    variance_repeats: int = 16  # per-block log-det variance report at the end (0: off)
    # bookkeeping
    experiment_name: str = "density"
    run_name: str | None = None
    resume: str | None = None
    checkpoint_dir: str = str(PROJECT_ROOT / "checkpoints")
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_blocks", tuple(self.n_blocks))
        hidden = self.hidden_channels
        object.__setattr__(self, "hidden_channels", (hidden,) if isinstance(hidden, int) else tuple(hidden))
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        positive = ("epochs", "batch_size", "eval_batch_size", "n_samples", "log_every", "max_passes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        super().__post_init__()  # the estimator and inverse options
        if self.variance_repeats == 1:
            raise ValueError("variance_repeats must be 0 (off) or >= 2 (a spread needs two draws)")
        for name in ("pad", "warmup_steps", "eval_every", "eval_max_images", "eval_subset", "variance_repeats"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        warmup_then(self.lr_schedule, self.warmup_steps, 1, self.lr_final_fraction)  # validates both
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if not self.sample_temperature >= 0:
            raise ValueError(f"sample_temperature must be >= 0, got {self.sample_temperature}")
        # the library validates its own pieces; building them here fails before any run starts
        self.architecture((1, 2 ** len(self.n_blocks), 2 ** len(self.n_blocks)))
        self.protocol()
        check_device_name(self.device)

    def architecture(self, input_shape: tuple[int, int, int]) -> FlowArchitecture:
        return FlowArchitecture(
            input_shape=input_shape,
            n_blocks=self.n_blocks,
            hidden_channels=self.hidden_channels,
            activation=self.activation,
            coeff=self.coeff,
            n_power_iterations=self.n_power_iterations,
            power_tol=self.power_tol,
            lipschitz=self.lipschitz,
        )

    def protocol(self) -> EvalProtocol:
        return EvalProtocol(bias_tol=self.bias_tol, se_tol=self.se_tol, max_passes=self.max_passes)


# Presets are data: each is a set of field values on top of the defaults.
PRESETS: dict[str, dict] = {
    # the embedded 5,000 MNIST digits; minutes on two CPU cores. The best configuration measured by
    # benchmarks/quality.py at the quick run's training CPU (README, "Quality per CPU second"): c close to 1,
    # a high rate decayed to zero, small batches, 2 series terms, a power iteration close to converged
    "quick": dict(
        coeff=0.97,
        lr=5e-2,
        lr_schedule="cosine",
        n_terms=2,
        n_power_iterations=10,
        batch_size=32,
        epochs=6,
        eval_every=3,
        eval_subset=100,  # epoch 3: indicative, two passes of 100 images
        # at c = 0.97 the unbiased evaluation costs ~11 CPU-s (two threads) per pass of the 1,000 test images: a
        # standard error of 0.005 bits/dim (two passes give ~0.003) keeps it under 10% of the job's CPU
        se_tol=5e-3,
        max_passes=10,
    ),
    # App. C.3 / Sec. 6: 3 scales x 32 blocks, 32 filters, 10 series terms, Adamax 3e-3, 200 epochs
    "paper-mnist": dict(
        dataset="mnist",
        pad=2,
        n_blocks=(32, 32, 32),
        hidden_channels=32,
        n_power_iterations=5,
        n_terms=10,
        epochs=200,
        batch_size=128,
        warmup_steps=1000,
        eval_every=10,
        grad_clip=100.0,
    ),
    # 3 scales x 32 blocks, 512 filters, 5 series terms
    "paper-cifar10": dict(
        dataset="cifar10",
        n_blocks=(32, 32, 32),
        hidden_channels=512,
        n_power_iterations=5,
        n_terms=5,
        epochs=200,
        batch_size=64,
        warmup_steps=1000,
        eval_every=10,
        grad_clip=100.0,
    ),
}


# --- the run ------------------------------------------------------------------------------------
def _input_shape(split: ImageSplit, pad: int) -> tuple[int, int, int]:
    c, h, w = split.images.shape[1:]
    return (c, h + 2 * pad, w + 2 * pad)


def _log_history_figure(run_id: str, out: Path, steps_per_epoch: int) -> None:
    client = mlflow.tracking.MlflowClient()
    fig, ax = new_figure()
    for key, label in (("train_loss", "train (per step)"), ("test_bpd", "test"), ("val_bpd", "validation")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        scale = 1 if key == "train_loss" else steps_per_epoch  # evaluations are logged per epoch
        if history:
            ax.plot(
                [m.step * scale for m in history],
                [m.value for m in history],
                marker="o" if key != "train_loss" else None,
                label=label,
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits/dim")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, out)


def run(cfg: DensityConfig, *, on_epoch_end: EpochHook | None = None) -> str:
    """Train and evaluate; returns the MLflow run id. ``on_epoch_end(epoch, metrics)`` sees each epoch's metrics.

    Under ``torchrun`` the ranks train data-parallel (see :mod:`pipeline.training.distributed`).
    """
    with distributed_session(cfg.device) as (ctx, device):
        return _run(cfg, ctx, device, on_epoch_end)


def _run(cfg: DensityConfig, ctx: DistributedContext, device: torch.device, on_epoch_end: EpochHook | None) -> str:
    check_global_batch(cfg.batch_size, ctx)
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)  # fails before a run exists
    train_split, val_split = (
        data.split_validation(cfg.validation_fraction, seed=cfg.seed)
        if cfg.validation_fraction > 0
        else (data.train, None)
    )
    eval_split = val_split if val_split is not None else data.test
    if cfg.eval_max_images:
        eval_split = eval_split.subset(torch.arange(min(cfg.eval_max_images, len(eval_split))))
    # evaluations before the last epoch see a cheap subset; the last one all
    subset_split = (
        eval_split.subset(torch.arange(min(cfg.eval_subset, len(eval_split)))) if cfg.eval_subset else eval_split
    )

    batches = shard_batches(epoch_batches(train_split, cfg.batch_size, cfg.seed), ctx)  # refuses a batch > data

    torch.manual_seed(cfg.seed)
    arch = cfg.architecture(_input_shape(data.train, cfg.pad))
    model = IResNetFlow(arch, estimator=cfg.training_estimator(), inverse_config=cfg.inverse_config()).to(device)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
    total_steps = cfg.epochs * (len(train_split) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then(cfg.lr_schedule, cfg.warmup_steps, total_steps, cfg.lr_final_fraction)
    )
    n_levels, pad = data.n_levels, cfg.pad

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return dequantize(pad_images(images.to(device, non_blocking=True), pad), n_levels)

    with cli.main_rank_run(cfg, ctx) as run_id:
        state, ckpt_path = cli.start_or_resume(
            cfg,
            run_id,
            model,
            optimizer,
            scheduler,
            device,
            # ActNorm's data-dependent initialisation on a large batch
            initialize=lambda: model(prepare(train_split.images[torch.randperm(len(train_split))[:512]])),
            params={
                "n_levels": n_levels,
                "input_shape": arch.input_shape,
                "n_parameters": n_parameters(model),
                "resolved_device": str(device),
            },
            ctx=ctx,
        )
        train_model = wrap_model(model, ctx, device)  # DDP under torchrun (after the initialisation)

        def step_fn(batch):
            images, _ = batch
            x = prepare(images)
            zs, logdet = train_model(x)
            log_prob = model.prior_log_prob(zs) + logdet
            bpd = bits_per_dim(log_prob, model.dim, n_levels).mean()
            return bpd, {"bpd": bpd.detach(), "logdet": logdet.detach().mean()}  # read at log_every, not per step

        def bpd_metrics(split: ImageSplit, prefix: str, protocol: EvalProtocol) -> dict[str, float]:
            return evaluate_bits_per_dim(
                model,
                split,
                n_levels=n_levels,
                pad=pad,
                batch_size=cfg.eval_batch_size,
                protocol=protocol,
                progress=cfg.progress,
            ).metrics(prefix)

        eval_cpu = {"seconds": 0.0}

        def evaluate(epoch: int) -> dict[str, float]:
            started = time.process_time()
            final = epoch == cfg.epochs
            # before the last epoch: the subset, and the fewest passes (an indicative value with its standard
            # error, converged or not); the full protocol runs once, at the end. n_images is logged with each
            split = eval_split if final else subset_split
            protocol = cfg.protocol() if final else replace(cfg.protocol(), max_passes=cfg.protocol().min_passes)
            metrics = bpd_metrics(split, "val" if val_split is not None else "test", protocol)
            if val_split is not None and final:
                metrics |= bpd_metrics(data.test, "test", protocol)
            eval_cpu["seconds"] += time.process_time() - started
            return metrics | {"eval_cpu_seconds": eval_cpu["seconds"]}  # cumulative, this process

        # the reference point: the diagonal Gaussian, exact and free (an untrained flow's value said nothing and
        # cost 1% of the quick run's CPU)
        if state is None and ctx.is_main:
            baseline = diagonal_gaussian_baseline_bits_per_dim(train_split, data.test, n_levels=n_levels, pad=pad)
            log_metrics({"baseline_diagonal_gaussian_test_bpd": baseline})
        loop = LoopConfig(
            log_metrics=log_metrics,
            epochs=cfg.epochs,
            checkpoint_path=ckpt_path,
            grad_clip=cfg.grad_clip,
            log_every=cfg.log_every,
            eval_every=cfg.eval_every,
            amp=cfg.amp,
            progress=cfg.progress,
            distributed=ctx,
        )

        fit(
            model,
            optimizer,
            scheduler,
            batches,
            step_fn,
            loop,
            state=state,
            evaluate=evaluate,
            checkpoint_extra={"config": asdict(cfg)},
            on_epoch_end=cli.chain_epoch_hooks(lambda epoch, _: cli.log_spectral_estimates(model, epoch), on_epoch_end),
        )
        cli.log_replica_consistency(model, ctx)
        if ctx.is_main:
            _log_final_artifacts(model, data.test, prepare, cfg, run_id, len(train_split) // cfg.batch_size)
            # what evaluation cost next to everything this process did (training, artifacts, evaluation)
            total = time.process_time()
            log_metrics({"process_cpu_seconds": total, "eval_cpu_fraction": eval_cpu["seconds"] / total})
    return run_id


@torch.no_grad()
def _log_final_artifacts(
    model: IResNetFlow, test: ImageSplit, prepare, cfg: DensityConfig, run_id: str, steps_per_epoch: int
) -> None:
    model.eval()
    crop = (slice(None), slice(None), slice(cfg.pad, -cfg.pad or None), slice(cfg.pad, -cfg.pad or None))
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.seed)
        out = Path(tmp)
        # samples
        report = InverseReport()
        samples = model.sample(cfg.n_samples, temperature=cfg.sample_temperature, report=report)
        save_image_grid(samples[crop] + 0.5, out / f"samples_T{cfg.sample_temperature:g}.png")
        log_metrics({f"sample_{k}": v for k, v in report.summary().items()})
        # reconstruction of encoded test images
        x = prepare(test.images[: cfg.n_samples])
        zs, _ = model(x)
        report = InverseReport()
        x_rec = model.inverse(zs, report=report)
        error = (x_rec - x).abs().flatten(1).max(dim=1).values
        log_metrics(
            {
                "recon_max_abs_error": float(error.max()),
                "recon_mean_abs_error": float(error.mean()),
                **{f"recon_{k}": v for k, v in report.summary().items()},
            }
        )
        pairs = torch.stack([x[:32], x_rec[:32]], dim=1).flatten(0, 1)
        save_image_grid(pairs[crop] + 0.5, out / "reconstructions.png")
        _log_history_figure(run_id, out / "history.png", max(1, steps_per_epoch))
        lips = model.lipschitz_bounds(method="certified")
        log_json(
            {"certified_lipschitz": lips, "estimated_lipschitz": model.lipschitz_bounds(method="estimate")},
            "lipschitz.json",
        )
        log_metrics({"max_block_lipschitz_certified": max(lips)})
        if cfg.variance_repeats:  # how noisy the training log-det is, block by block
            rows = logdet_variance_report(model, x[:16], cfg.training_estimator(), n_repeats=cfg.variance_repeats)
            write_csv(rows, out / "logdet_variance.csv")
            log_metrics(
                {
                    "train_logdet_std_bpd": total_logdet_std_bits_per_dim(rows),
                    "train_logdet_std_bpd_max_block": max(r["std_bits_per_dim"] for r in rows),
                }
            )
        mlflow.log_artifacts(str(out))
    log_model(model)


# --- command line -------------------------------------------------------------------------------
def config_from_preset(preset: str, **overrides) -> DensityConfig:
    return cli.config_from_preset(DensityConfig, PRESETS, preset, **overrides)


def config_for_resume(run_id: str, **overrides) -> DensityConfig:
    return cli.config_for_resume(DensityConfig, run_id, **overrides)


def main(argv: list[str] | None = None) -> int:
    return cli.entry_point_main(DensityConfig, PRESETS, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
