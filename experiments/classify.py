"""``mlflow run . -e classify``: i-ResNet vs vanilla ResNet, with invertibility measured (Table 2, Figs. 3, 6-8).

    python -m experiments.classify --model iresnet            # preset "quick": embedded digits
    python -m experiments.classify --model resnet-bn
    python -m experiments.classify --preset paper-cifar10 --data-dir ~/data --device cuda --coeff 0.7
    python -m experiments.classify --resume <run_id>
    torchrun --nproc_per_node 4 -m experiments.classify --preset paper-cifar10 --data-dir ~/data   # 4 GPUs

Every option left unset takes the preset's value.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F

from experiments import cli
from experiments.tracking import PROJECT_ROOT, log_json, log_metrics, log_model, write_csv
from pipeline.data import DATASETS, ImageSplit, epoch_batches, iterate_batches, load_dataset
from pipeline.data.augment import AUGMENTATIONS, Augmentation
from pipeline.diagnostics import certified_lipschitz, layer_operator_norms, reconstruction_error_curve
from pipeline.models import ClassifierArchitecture, ResidualClassifier
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
from pipeline.training.schedule import linear_warmup, step_decay
from pipeline.transforms import InverseReport

log = logging.getLogger("experiments.classify")

MODELS = ("iresnet", "resnet", "resnet-bn")
OPTIMIZERS = ("sgd", "adam", "adamax")


@dataclass(frozen=True)
class ClassifyConfig(cli.InverseOptions):
    """Everything a classification run needs; validated in one place (``__post_init__``).

    The inverse's options (``inverse_tol``, ``inverse_method``) come from :class:`experiments.cli.InverseOptions`.
    """

    preset: str = "quick"
    # data
    dataset: str = "digits-mnist5k"
    data_dir: str | None = None
    download: bool = False
    augment: bool = True
    validation_fraction: float = 0.0  # > 0: per-epoch error on a held-out part of train (sweeps), test at the end
    # model
    model: str = "iresnet"
    n_blocks: tuple[int, ...] = (4, 4, 4)
    hidden_channels: tuple[int, ...] = (16, 32, 64)
    strides: tuple[int, ...] = (1, 2, 2)
    injective_padding: int = 3
    init_squeeze: bool = False
    activation: str = "elu"
    coeff: float = 0.9
    n_power_iterations: int = 1
    power_tol: float = 0.0  # > 0: each step's power iteration runs to this relative change of sigma
    lipschitz: str = "soft"  # "strict": every training forward applies norms <= c (certified bound per step)
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (6, 8)  # epochs at which the lr is multiplied by lr_decay
    lr_decay: float = 0.2
    warmup_steps: int = 0
    epochs: int = 10
    batch_size: int = 128
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads of this process; 0: the cores divided among the local workers
    deterministic: bool = False  # deterministic kernels (GPU): a resumed run then equals an uninterrupted one
    amp: bool = False
    # evaluation and invertibility analysis
    eval_batch_size: int = 500
    recon_images: int = 16
    recon_iterations: tuple[int, ...] = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100)
    # bookkeeping
    experiment_name: str = "classify"
    run_name: str | None = None
    resume: str | None = None
    checkpoint_dir: str = str(PROJECT_ROOT / "checkpoints")
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_blocks", "hidden_channels", "strides", "milestones", "recon_iterations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()  # the inverse options
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODELS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        for name in ("epochs", "batch_size", "eval_batch_size", "recon_images", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")
        if not self.recon_iterations or min(self.recon_iterations) < 1:
            raise ValueError(f"recon_iterations must be positive, got {self.recon_iterations}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        check_device_name(self.device)
        self.architecture((1, 32, 32), 10)  # the library validates the rest (c in (0, 1), stages, ...)

    def architecture(self, input_shape: tuple[int, int, int], num_classes: int) -> ClassifierArchitecture:
        vanilla = self.model != "iresnet"
        return ClassifierArchitecture(
            input_shape=input_shape,
            num_classes=num_classes,
            n_blocks=self.n_blocks,
            hidden_channels=self.hidden_channels,
            strides=self.strides,
            injective_padding=self.injective_padding,
            init_squeeze=self.init_squeeze,
            activation=self.activation,
            coeff=None if vanilla else self.coeff,
            n_power_iterations=self.n_power_iterations,
            power_tol=0.0 if vanilla else self.power_tol,
            lipschitz=self.lipschitz,
            norm="none" if self.model == "resnet-bn" else "actnorm",
            branch_batchnorm=self.model == "resnet-bn",
        )


_PAPER_SCHEDULE = dict(
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    milestones=(60, 120, 160),
    lr_decay=0.2,
    epochs=200,
    batch_size=128,
    n_power_iterations=1,
)
PRESETS: dict[str, dict] = {
    "quick": {},
    # App. C.2: 39 pre-activation bottleneck blocks (13 per stage), two squeezes, c = 0.9
    "paper-mnist": dict(
        dataset="mnist", n_blocks=(13, 13, 13), hidden_channels=(32, 64, 128), injective_padding=3, **_PAPER_SCHEDULE
    ),
    "paper-cifar10": dict(
        dataset="cifar10", n_blocks=(13, 13, 13), hidden_channels=(32, 64, 128), injective_padding=13, **_PAPER_SCHEDULE
    ),
    "paper-cifar100": dict(
        dataset="cifar100",
        n_blocks=(13, 13, 13),
        hidden_channels=(32, 64, 128),
        injective_padding=13,
        **_PAPER_SCHEDULE,
    ),
}


def _normalization(train: ImageSplit) -> tuple[torch.Tensor, torch.Tensor]:
    x = train.images.float() / 255.0
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _optimizer(cfg: ClassifyConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.Adamax
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def run(cfg: ClassifyConfig, *, on_epoch_end: EpochHook | None = None) -> str:
    """Train, evaluate and measure invertibility; returns the MLflow run id.

    ``on_epoch_end(epoch, metrics)`` sees each epoch's metrics (a sweep reports and prunes there). Under
    ``torchrun`` the ranks train data-parallel (see :mod:`pipeline.training.distributed`).
    """
    with distributed_session(cfg.device) as (ctx, device):
        return _run(cfg, ctx, device, on_epoch_end)


def _run(cfg: ClassifyConfig, ctx: DistributedContext, device: torch.device, on_epoch_end: EpochHook | None) -> str:
    check_global_batch(cfg.batch_size, ctx)
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)
    if data.n_levels != 256:
        log.info(
            "dataset %s has %d intensity levels; inputs are scaled by 1/255 all the same", data.name, data.n_levels
        )
    train_split, val_split = (
        data.split_validation(cfg.validation_fraction, seed=cfg.seed)
        if cfg.validation_fraction > 0
        else (data.train, None)
    )
    mean, std = (t.to(device) for t in _normalization(train_split))
    augment = AUGMENTATIONS.get(cfg.dataset, Augmentation()) if cfg.augment else Augmentation()

    def prepare(images: torch.Tensor, train: bool) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        if train:
            images = augment(images)
        return (images.float() / 255.0 - mean[:, None, None]) / std[:, None, None]

    torch.manual_seed(cfg.seed)
    arch = cfg.architecture(data.shape, data.num_classes)
    model = ResidualClassifier(arch, inverse_config=cfg.inverse_config()).to(device)
    optimizer = _optimizer(cfg, model.parameters())
    batches = epoch_batches(train_split, cfg.batch_size, cfg.seed)  # refuses a batch larger than the data
    steps_per_epoch = len(train_split) // cfg.batch_size
    warmup, decay = linear_warmup(cfg.warmup_steps), step_decay(cfg.milestones, cfg.lr_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup(step) * decay(step // steps_per_epoch))

    with cli.main_rank_run(cfg, ctx) as run_id:
        state, ckpt_path = cli.start_or_resume(
            cfg,
            run_id,
            model,
            optimizer,
            scheduler,
            device,
            # ActNorm's data-dependent initialisation (the model is in train mode from construction)
            initialize=lambda: model(prepare(train_split.images[torch.randperm(len(train_split))[:512]], train=False)),
            params={
                "input_shape": arch.input_shape,
                "num_classes": arch.num_classes,
                "n_parameters": n_parameters(model),
                "resolved_device": str(device),
                "invertible_by_construction": arch.invertible,
            },
            ctx=ctx,
        )
        if ctx.is_main:
            if state is None:
                log_json({"mean": mean.tolist(), "std": std.tolist()}, "normalization.json")
            mlflow.set_tag("model", cfg.model)
        train_model = wrap_model(model, ctx, device)  # DDP under torchrun (after the initialisation)

        def step_fn(batch):
            images, labels = batch
            logits = train_model(prepare(images, train=True))
            labels = labels.to(device, non_blocking=True)
            loss = F.cross_entropy(logits, labels)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            return loss, {"accuracy": accuracy.detach()}  # read at log_every, not per step

        @torch.no_grad()
        def error_and_loss(split: ImageSplit) -> tuple[float, float]:
            model.eval()
            correct, total_loss = 0, 0.0
            for images, labels in iterate_batches(split, cfg.eval_batch_size, shuffle=False):
                logits = model(prepare(images, train=False))
                labels = labels.to(device)
                total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=1) == labels).sum())
            model.train()
            return 100.0 * (1 - correct / len(split)), total_loss / len(split)

        def evaluate(epoch: int) -> dict[str, float]:
            metrics = {}
            if val_split is not None:
                metrics["val_error"], metrics["val_loss"] = error_and_loss(val_split)
            if val_split is None or epoch == cfg.epochs:
                metrics["test_error"], metrics["test_loss"] = error_and_loss(data.test)
            return metrics

        batches = shard_batches(batches, ctx)
        loop = LoopConfig(
            log_metrics=log_metrics,
            epochs=cfg.epochs,
            checkpoint_path=ckpt_path,
            grad_clip=cfg.grad_clip,
            log_every=cfg.log_every,
            eval_every=1,
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
            _measure_invertibility(model, data.test, prepare, mean, std, cfg)
            log_model(model)
    return run_id


@torch.no_grad()
def _measure_invertibility(
    model: ResidualClassifier, test: ImageSplit, prepare, mean, std, cfg: ClassifyConfig
) -> None:
    """Reconstruction error vs iterations (Fig. 8), grids (Figs. 3/7), layer norms (Fig. 6), throughput."""
    model.eval()
    x = prepare(test.images[: cfg.recon_images], train=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Fig. 8: error after exactly k iterations per block
        curve = reconstruction_error_curve(model, x, cfg.recon_iterations)
        write_csv(curve, out / "reconstruction_vs_iterations.csv")
        for row in curve:
            value = row["rel_error_mean"]
            log_metrics({"recon_rel_error_mean": value if math.isfinite(value) else 1e30}, row["iterations"])
        fig, ax = new_figure()
        ax.semilogy([r["iterations"] for r in curve], [max(r["rel_error_mean"], 1e-16) for r in curve], marker="o")
        ax.set_xlabel("fixed-point iterations per block")
        ax.set_ylabel("relative reconstruction error")
        ax.set_title(f"{cfg.model}" + (f", c = {cfg.coeff}" if cfg.model == "iresnet" else ""))
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
                "recon_rel_error_max": final_error if math.isfinite(final_error) else 1e30,
                "inverse_images_per_second": len(x) / seconds,
                **{f"recon_{k}": v for k, v in report.summary().items()},
            }
        )
        # Fig. 6: certified largest singular value of every operator
        norms = layer_operator_norms(model)
        write_csv(norms, out / "layer_spectral_norms.csv")
        fig, ax = new_figure(7, 4)
        ax.plot(range(len(norms)), [r["norm"] for r in norms], marker=".", linestyle="none")
        ax.axhline(1.0, color="k", linewidth=0.8)
        if cfg.model == "iresnet":
            ax.axhline(cfg.coeff, color="r", linestyle="--", linewidth=0.8, label=f"c = {cfg.coeff}")
            ax.legend()
        ax.set_xlabel("layer")
        ax.set_ylabel("largest singular value (certified)")
        save_figure(fig, out / "layer_spectral_norms.png")
        bounds, certified = certified_lipschitz(model)
        log_json({"block_lipschitz_certified": bounds, "certified_invertible": certified}, "lipschitz.json")
        log_metrics(
            {
                "max_layer_norm": max(r["norm"] for r in norms),
                "max_block_lipschitz": max(bounds),
                "certified_invertible": float(certified),
            }
        )
        mlflow.set_tag("certified_invertible", str(certified).lower())
        mlflow.log_artifacts(str(out))


# --- command line -------------------------------------------------------------------------------
def config_from_preset(preset: str, **overrides) -> ClassifyConfig:
    return cli.config_from_preset(ClassifyConfig, PRESETS, preset, **overrides)


def config_for_resume(run_id: str, **overrides) -> ClassifyConfig:
    return cli.config_for_resume(ClassifyConfig, run_id, **overrides)


def main(argv: list[str] | None = None) -> int:
    return cli.entry_point_main(ClassifyConfig, PRESETS, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
