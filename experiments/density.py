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
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.config import check_at_least, check_common
from experiments.density_artifacts import log_final_artifacts
from experiments.entry_point import EntryPoint
from experiments.metric_logging import log_metrics
from experiments.options import (
    SERIES,
    ArchitectureOptions,
    DataOptions,
    EstimatorOptions,
    InverseOptions,
    RunOptions,
    TrainingOptions,
)
from experiments.runner import Splits, run_training
from pipeline.data import DATASETS, ImageSplit, dequantize, pad_images
from pipeline.evaluation import EvalProtocol, diagonal_gaussian_baseline_bits_per_dim, evaluate_bits_per_dim
from pipeline.fields import documented, when
from pipeline.metrics import bits_per_dim
from pipeline.models import FLOW_PRESETS, FlowArchitecture, IResNetFlow
from pipeline.models.base import n_parameters
from pipeline.training.device import check_device_name
from pipeline.training.distributed import SINGLE_PROCESS, DistributedContext
from pipeline.training.loop import EpochHook, LoopState
from pipeline.training.schedule import warmup_then

log = logging.getLogger("experiments.density")


@dataclass(frozen=True)
class DensityData:
    """The density run's data option beside the shared ones."""

    GROUP: ClassVar[str] = "data"
    # the reference code pads MNIST to 32x32
    pad: int = documented(0, "zero pixels added on each side of every image (>= 0)")
    # the reference code's MNIST: the grey digit repeated to RGB, each copy dequantised, 3,072 dimensions
    repeat_channels: int = documented(
        1, "each image's channels repeated this many times (>= 1; 3 on MNIST: the paper's code), then dequantised"
    )


@dataclass(frozen=True)
class DensityTraining:
    """The density run's learning-rate decay (Adamax, after the shared warm-up)."""

    GROUP: ClassVar[str] = "training"
    lr_schedule: str = documented("constant", "after the warm-up: constant, or cosine (decay to the last step)")
    lr_final_fraction: float = documented(
        0.0, "the cosine schedule's last rate as a fraction of lr, in [0, 1]", applies=when("lr_schedule", "cosine")
    )


@dataclass(frozen=True)
class DensityEvaluation:
    """The bits/dim evaluation's protocol and the end of run's samples and log-det variance report."""

    GROUP: ClassVar[str] = "evaluation"
    eval_every: int = documented(5, "epochs between evaluations (>= 0); 0: only after the last epoch")
    eval_batch_size: int = documented(250, "images per evaluation forward (>= 1)")
    eval_max_images: int = documented(0, "evaluate on the split's first N images (>= 0); 0: the whole split")
    eval_subset: int = documented(
        200, "images of the cheap evaluations before the last epoch (>= 0); 0: as many as the last",
        applies=lambda o: o["eval_every"] > 0,
    )  # fmt: skip
    bias_tol: float = documented(1e-4, "largest truncation bias of the evaluation's power series (bits/dim, > 0)")
    se_tol: float = documented(1e-3, "standard error (bits/dim, > 0) at which the evaluation's passes stop")
    max_passes: int = documented(20, "most passes over the evaluated images (>= 1)")
    n_samples: int = documented(64, "samples and reconstructions drawn at the end (>= 1)")
    sample_temperature: float = documented(1.0, "temperature of the end-of-run samples (>= 0; 1: the model)")
    variance_repeats: int = documented(
        16, "draws of the per-block log-det variance report at the end (0: off, else >= 2)"
    )


@dataclass(frozen=True)
class DensityConfig(
    DensityEvaluation,
    EstimatorOptions,
    InverseOptions,
    DensityTraining,
    TrainingOptions,
    ArchitectureOptions,
    DensityData,
    DataOptions,
    RunOptions,
):
    """Everything a density run needs; validated in one place (``__post_init__``).

    The flow is the model preset ``architecture`` (:data:`pipeline.models.FLOW_PRESETS`) with any of its
    :class:`~pipeline.models.FlowArchitecture` fields replaced (``--coeff``, ``--n-blocks``, ...); the other groups
    are :mod:`experiments.options`' (data, training, run, estimator, inverse) with the density run's own additions
    to data, training and evaluation.
    """

    ARCHITECTURES: ClassVar = FLOW_PRESETS
    preset: str = documented("quick", "the entry point's preset: model and training settings (PRESETS)")

    # what a run checkpointed before these fields existed used (config_for_resume): the architecture's defaults,
    # which are the paper's flow
    BEFORE_FIELD_EXISTED: ClassVar[dict] = {
        f.name: f.default
        for f in fields(FlowArchitecture)
        if f.name in ("logit_alpha", "split_prior", "fc_blocks", "fc_hidden", "invertible_1x1")
    }

    def __post_init__(self) -> None:
        check_common(self)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.compile and self.estimator in SERIES and self.gradient == "neumann":
            raise ValueError(
                "compile traces the training step with gradient=backprop (the series' products in closed form); the "
                "Neumann gradient's autograd function does not trace yet: pass --gradient backprop, or compile false"
            )
        positive: tuple[str, ...] = ("epochs", "batch_size", "eval_batch_size", "n_samples", "log_every")
        positive += ("max_passes", "repeat_channels")
        check_at_least(self, 1, positive)
        check_at_least(self, 0, ("pad", "warmup_steps", "eval_every", "eval_max_images", "eval_subset", "grad_clip"))
        if self.variance_repeats < 0 or self.variance_repeats == 1:
            raise ValueError("variance_repeats must be 0 (off) or >= 2 (a spread needs two draws)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        warmup_then(self.lr_schedule, self.warmup_steps, 1, self.lr_final_fraction)  # validates both
        if not self.sample_temperature >= 0:
            raise ValueError(f"sample_temperature must be >= 0, got {self.sample_temperature}")
        # the library validates its own pieces; building them here fails before any run starts
        self.training_estimator()
        self.inverse_config()
        side = 2 ** len(self.architecture_option("n_blocks"))
        self.flow_architecture((1, side, side))
        self.protocol()
        check_device_name(self.device)

    def architecture_option(self, name: str) -> Any:
        value = super().architecture_option(name)
        if name == "hidden_channels" and name not in self.architecture_overrides and len(set(value)) == 1:
            return value[:1]  # the preset's one width for every level, whatever the number of levels (--n-blocks)
        return value

    def flow_architecture(self, input_shape: tuple[int, int, int]) -> FlowArchitecture:
        hidden = self.architecture_option("hidden_channels")
        return self.resolved_architecture(input_shape=input_shape, hidden_channels=hidden)

    def protocol(self) -> EvalProtocol:
        return EvalProtocol(bias_tol=self.bias_tol, se_tol=self.se_tol, max_passes=self.max_passes)


# Presets are data: a model preset and training settings, on top of the defaults.
PRESETS: dict[str, dict] = {
    # the embedded 5,000 MNIST digits; minutes on two CPU cores. The configuration benchmarks/quality.py chose on
    # its validation split at the quick run's training CPU (docs/benchmarks.md): the "quick" flow (stage 2 of the
    # benchmark), Adamax decayed to zero (stage 1), a 300-step warm-up to 0.25 in batches of 16 (stage 3), and the
    # unbiased roulette estimator: with a truncated series the flow learns to exploit the truncation (2 terms:
    # train 0.85, test 1.80 bits/dim)
    "quick": dict(
        architecture="quick",
        lr=0.25,
        lr_schedule="cosine",
        estimator="russian_roulette",
        batch_size=16,
        warmup_steps=300,
        epochs=6,  # ~3.5 minutes on two cores (the README's quick start measures it); 5 is the limit
        eval_every=0,  # once, after the last epoch: a mid-run evaluation would take the job over 10% of its CPU
        eval_subset=100,  # with -P eval_every=3: indicative, two passes of 100 images
        # at c = 0.99 the unbiased evaluation costs ~18 CPU-s (two threads) per pass of the 1,000 test images (~38
        # series terms): a standard error of 0.005 bits/dim (two passes give ~0.0015) keeps it under 10% of the CPU
        se_tol=5e-3,
        max_passes=10,
    ),
    # App. C.3 / Sec. 6: 3 scales x 32 blocks, 32 filters, 10 series terms, Adamax 3e-3, 200 epochs
    # the paper's code's flow and MNIST protocol: 28x28 digits padded to 32x32 and repeated to 3 channels
    "paper-mnist": dict(
        dataset="mnist",
        pad=2,
        repeat_channels=3,
        architecture="paper-mnist",
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
        architecture="paper-cifar10",
        n_terms=5,
        epochs=200,
        batch_size=64,
        warmup_steps=1000,
        eval_every=10,
        grad_clip=100.0,
    ),
}


# --- the run ------------------------------------------------------------------------------------
class DensityTask:
    """Maximum likelihood of the i-ResNet flow on dequantised images, scored in bits/dim."""

    def __init__(
        self, cfg: DensityConfig, splits: Splits, device: torch.device, ctx: DistributedContext = SINGLE_PROCESS
    ) -> None:
        self.cfg, self.splits, self.device, self.ctx = cfg, splits, device, ctx
        data = splits.data
        self.n_levels = data.n_levels
        evaluated = splits.validation if splits.validation is not None else data.test
        if cfg.eval_max_images:
            evaluated = evaluated.subset(torch.arange(min(cfg.eval_max_images, len(evaluated))))
        self.evaluated = evaluated
        # evaluations before the last epoch see a cheap subset; the last one all
        self.evaluated_subset = (
            evaluated.subset(torch.arange(min(cfg.eval_subset, len(evaluated)))) if cfg.eval_subset else evaluated
        )
        c, h, w = data.train.images.shape[1:]
        self.arch = cfg.flow_architecture((c * cfg.repeat_channels, h + 2 * cfg.pad, w + 2 * cfg.pad))
        self.model = IResNetFlow(self.arch, estimator=cfg.training_estimator(), inverse_config=cfg.inverse_config()).to(
            device
        )
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=cfg.lr)
        self.steps_per_epoch = len(splits.train) // cfg.batch_size
        schedule = warmup_then(
            cfg.lr_schedule, cfg.warmup_steps, cfg.epochs * self.steps_per_epoch, cfg.lr_final_fraction
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.eval_every = cfg.eval_every
        self.loss_name = "bpd"

    def prepare(self, images: Tensor) -> Tensor:
        images = pad_images(images.to(self.device, non_blocking=True), self.cfg.pad, self.cfg.repeat_channels)
        return dequantize(images, self.n_levels)

    def initialize(self) -> None:  # ActNorm's data-dependent initialisation on a large batch
        train = self.splits.train
        self.model(self.prepare(train.images[torch.randperm(len(train))[:512]]))

    def params(self) -> dict:
        return {
            "n_levels": self.n_levels,
            "input_shape": self.arch.input_shape,
            "n_parameters": n_parameters(self.model),
            "resolved_device": str(self.device),
        }

    def on_start(self, new_run: bool) -> None:
        if self.cfg.eval_every == 0:
            log.info("eval_every=0: the flow is evaluated once, after the last epoch (%d)", self.cfg.epochs)
        # the reference point: the diagonal Gaussian, exact and free (an untrained flow's value said nothing and
        # cost 1% of the quick run's CPU)
        if new_run:
            baseline = diagonal_gaussian_baseline_bits_per_dim(
                self.splits.train,
                self.splits.data.test,
                n_levels=self.n_levels,
                pad=self.cfg.pad,
                repeat_channels=self.cfg.repeat_channels,
            )
            log_metrics({"test/bpd_baseline_diagonal_gaussian": baseline}, 0)

    def step(self, forward: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, _ = batch
        zs, logdet = forward(self.prepare(images))
        bpd = bits_per_dim(self.model.prior_log_prob(zs) + logdet, self.model.dim, self.n_levels).mean()
        return bpd, {"logdet_nats": logdet.detach().mean()}  # read at log_every, not per step

    def _bits_per_dim(self, split: ImageSplit, name: str, protocol: EvalProtocol) -> dict[str, float]:
        cfg = self.cfg
        return evaluate_bits_per_dim(
            self.model,
            split,
            n_levels=self.n_levels,
            pad=cfg.pad,
            repeat_channels=cfg.repeat_channels,
            batch_size=cfg.eval_batch_size,
            protocol=protocol,
            progress=cfg.progress and self.ctx.is_main,
            ctx=self.ctx,
        ).metrics(name)

    def evaluate(self, epoch: int) -> dict[str, float]:
        final = epoch == self.cfg.epochs
        # before the last epoch: the subset, and the fewest passes (an indicative value with its standard
        # error, converged or not); the full protocol runs once, at the end. n_images is logged with each
        protocol = self.cfg.protocol()
        if not final:
            protocol = replace(protocol, max_passes=protocol.min_passes)
        held_out = self.splits.validation is not None
        metrics = self._bits_per_dim(
            self.evaluated if final else self.evaluated_subset, "val" if held_out else "test", protocol
        )
        if held_out and final:
            metrics |= self._bits_per_dim(self.splits.data.test, "test", protocol)
        return metrics

    def finalise(self, run_id: str, state: LoopState) -> str:
        data, step, results = self.splits.data, state.step, state.model_results
        lipschitz = log_final_artifacts(
            self.model, data.test, data.n_levels, self.prepare, self.cfg, run_id, step, results
        )
        # what evaluation cost next to everything the run's processes did (training, artifacts, evaluation)
        total = state.cpu_seconds()
        log_metrics({"eval/process_cpu_seconds": total, "eval/cpu_fraction": state.eval_cpu_seconds / total}, step)
        return headline(results, lipschitz, self.cfg, data.name, step)


def headline(results: Mapping[str, float], lipschitz: float, cfg: DensityConfig, dataset: str, step: int) -> str:
    """The run's result in a sentence (its description): test bits/dim with its standard error and how it was
    estimated, the certified Lipschitz bound, the training."""
    if "test/bpd" not in results:  # a run whose last epoch was evaluated by an earlier release
        return f"{cfg.epochs} epochs ({step:,} steps) on {dataset}; every block certified Lipschitz <= {lipschitz:.4f}"
    how = "unbiased Russian-roulette log-det" if results["test/unbiased"] else "Theorem-3 power series"
    bias = "" if results["test/unbiased"] else f", bias <= {results['test/bias_bound_bpd']:.1e}"
    converged = "converged" if results["test/converged"] else "**not converged** (max_passes reached)"
    return (
        f"**test {results['test/bpd']:.4f} ± {results['test/standard_error_bpd']:.4f} bits/dim** on "
        f"{int(results['test/images']):,} {dataset} images ({how}{bias}, {converged}); every block certified "
        f"Lipschitz <= {lipschitz:.4f} (c = {cfg.architecture_option('coeff'):.4g}); "
        f"{cfg.epochs} epochs, {step:,} steps"
    )


def run(cfg: DensityConfig, *, on_epoch_end: EpochHook | None = None) -> str:
    """Train and evaluate; returns the MLflow run id. ``on_epoch_end(epoch, metrics)`` sees each epoch's metrics.

    Under ``torchrun`` the ranks train data-parallel (see :mod:`pipeline.training.distributed`).
    """
    return run_training(cfg, DensityTask, on_epoch_end)


# --- command line -------------------------------------------------------------------------------
ENTRY = EntryPoint(DensityConfig, PRESETS, run, __doc__)
config_from_preset, config_for_resume, main = ENTRY.config_from_preset, ENTRY.config_for_resume, ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
