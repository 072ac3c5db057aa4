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
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import mlflow
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.classify_artifacts import measure_invertibility
from experiments.config import check_at_least, check_common
from experiments.entry_point import EntryPoint
from experiments.models import log_pyfunc_model
from experiments.options import ArchitectureOptions, DataOptions, InverseOptions, RunOptions, TrainingOptions
from experiments.runner import Splits, run_training
from experiments.tracking import log_json
from pipeline.data import DATASETS, ImageSplit, iterate_batches
from pipeline.data.augment import AUGMENTATIONS, Augmentation
from pipeline.data.preprocessing import standardize
from pipeline.fields import documented, when
from pipeline.models import (
    CLASSIFIER_MODELS,
    CLASSIFIER_PRESETS,
    ClassifierArchitecture,
    ResidualClassifier,
    classifier_variant,
)
from pipeline.models.base import n_parameters
from pipeline.training.device import check_device_name
from pipeline.training.distributed import SINGLE_PROCESS, DistributedContext, sum_over_ranks
from pipeline.training.loop import EpochHook, LoopState
from pipeline.training.schedule import linear_warmup, step_decay

log = logging.getLogger("experiments.classify")

MODELS = CLASSIFIER_MODELS
OPTIMIZERS = ("sgd", "adam", "adamax")


@dataclass(frozen=True)
class ClassifyData:
    GROUP: ClassVar[str] = "data"
    augment: bool = documented(True, "the paper's augmentation of the training images (shifts, crops, flips)")


@dataclass(frozen=True)
class ClassifyModel:
    GROUP: ClassVar[str] = "model"
    model: str = documented(
        "iresnet", "iresnet (spectrally normalised), resnet (the same unconstrained) or resnet-bn (with BatchNorm)"
    )


@dataclass(frozen=True)
class ClassifyTraining:
    """The optimiser and its step schedule (after the shared warm-up)."""

    GROUP: ClassVar[str] = "training"
    optimizer: str = documented("sgd", "sgd, adam or adamax")
    momentum: float = documented(0.9, "SGD momentum (>= 0)", applies=when("optimizer", "sgd"))
    nesterov: bool = documented(False, "Nesterov momentum (SGD)", applies=when("optimizer", "sgd"))
    weight_decay: float = documented(5e-4, "L2 weight decay (>= 0)")
    milestones: tuple[int, ...] = documented(
        (6, 8), "epochs after which the rate is multiplied by lr_decay, e.g. 60,120"
    )
    lr_decay: float = documented(
        0.2, "factor of the rate at each milestone, in (0, 1]", applies=lambda o: bool(o["milestones"])
    )


@dataclass(frozen=True)
class ClassifyEvaluation:
    """The test error's batches and the invertibility study (reconstruction error against iterations)."""

    GROUP: ClassVar[str] = "evaluation"
    eval_batch_size: int = documented(500, "images per evaluation forward (>= 1)")
    recon_images: int = documented(16, "test images reconstructed from their features at the end (>= 1)")
    recon_iterations: tuple[int, ...] = documented(
        (1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100), "fixed-point iterations per block of the Fig. 8 curve"
    )


@dataclass(frozen=True)
class ClassifyConfig(
    ClassifyEvaluation,
    InverseOptions,
    ClassifyTraining,
    TrainingOptions,
    ClassifyModel,
    ArchitectureOptions,
    ClassifyData,
    DataOptions,
    RunOptions,
):
    """Everything a classification run needs; validated in one place (``__post_init__``).

    The network is the model preset ``architecture`` (:data:`pipeline.models.CLASSIFIER_PRESETS`) with any of its
    :class:`~pipeline.models.ClassifierArchitecture` fields replaced, as the ``model`` variant
    (:func:`pipeline.models.classifier_variant`); the other groups are :mod:`experiments.options`' with the
    classification run's own additions to data, training and evaluation.
    """

    ARCHITECTURES: ClassVar = CLASSIFIER_PRESETS
    # what a run checkpointed before its architecture was recorded computed (config_for_resume): the paper presets'
    # squeeze order and head have changed since
    PRESET_FIELDS_BEFORE: ClassVar[dict] = {
        "squeeze_order": "channel_major",
        "head_activation": None,
        "head_batchnorm_momentum": 0.1,
    }
    FROM_DATA: ClassVar = ("input_shape", "num_classes")
    preset: str = documented("quick", "the entry point's preset: model and training settings (PRESETS)")

    def __post_init__(self) -> None:
        check_common(self)
        for name in ("milestones", "recon_iterations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODELS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        check_at_least(self, 1, ("epochs", "batch_size", "eval_batch_size", "recon_images", "log_every"))
        check_at_least(self, 0, ("warmup_steps", "weight_decay", "grad_clip", "momentum"))
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}")
        if not self.recon_iterations or min(self.recon_iterations) < 1:
            raise ValueError(f"recon_iterations must be positive, got {self.recon_iterations}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        check_device_name(self.device)
        self.inverse_config()
        self.classifier_architecture((1, 32, 32), 10)  # the library validates the rest (c in (0, 1), stages, ...)

    def classifier_architecture(self, input_shape: tuple[int, int, int], num_classes: int) -> ClassifierArchitecture:
        arch = self.resolved_architecture(input_shape=input_shape, num_classes=num_classes)
        return classifier_variant(arch, self.model)


_PAPER_SCHEDULE = dict(
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    milestones=(60, 120, 160),
    lr_decay=0.2,
    epochs=200,
    batch_size=128,
)
# Presets are data: a model preset and training settings, on top of the defaults.
PRESETS: dict[str, dict] = {
    "quick": dict(architecture="quick", lr=0.1, batch_size=128),
    # App. C.2: 39 pre-activation bottleneck blocks (13 per stage), two squeezes, c = 0.9, 1 power iteration
    "paper-mnist": dict(dataset="mnist", architecture="paper-mnist", **_PAPER_SCHEDULE),
    "paper-cifar10": dict(dataset="cifar10", architecture="paper-cifar10", **_PAPER_SCHEDULE),
    "paper-cifar100": dict(dataset="cifar100", architecture="paper-cifar100", **_PAPER_SCHEDULE),
}


def _normalization(train: ImageSplit) -> tuple[Tensor, Tensor]:
    x = train.images.float() / 255.0
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _optimizer(cfg: ClassifyConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.Adamax
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class ClassifyTask:
    """Cross-entropy training of a residual classifier; test error per epoch, invertibility measured at the end."""

    eval_every = 1
    loss_name = "cross_entropy_nats"

    def __init__(
        self, cfg: ClassifyConfig, splits: Splits, device: torch.device, ctx: DistributedContext = SINGLE_PROCESS
    ) -> None:
        self.cfg, self.splits, self.device, self.ctx = cfg, splits, device, ctx
        data = splits.data
        if data.n_levels != 256:
            log.info(
                "dataset %s has %d intensity levels; inputs are scaled by 1/255 all the same", data.name, data.n_levels
            )
        self.mean, self.std = (t.to(device) for t in _normalization(splits.train))
        self.augment = AUGMENTATIONS.get(cfg.dataset, Augmentation()) if cfg.augment else Augmentation()
        self.arch = cfg.classifier_architecture(data.shape, data.num_classes)
        self.model = ResidualClassifier(self.arch, inverse_config=cfg.inverse_config()).to(device)
        self.optimizer = _optimizer(cfg, self.model.parameters())
        steps_per_epoch = len(splits.train) // cfg.batch_size
        warmup, decay = linear_warmup(cfg.warmup_steps), step_decay(cfg.milestones, cfg.lr_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup(step) * decay(step // steps_per_epoch)
        )

    def prepare(self, images: Tensor, train: bool) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        if train:
            images = self.augment(images)
        return standardize(images, self.mean, self.std)

    def initialize(self) -> None:  # ActNorm's data-dependent initialisation (the model is in train mode)
        train = self.splits.train
        self.model(self.prepare(train.images[torch.randperm(len(train))[:512]], train=False))

    def params(self) -> dict:
        return {
            "input_shape": self.arch.input_shape,
            "num_classes": self.arch.num_classes,
            "n_parameters": n_parameters(self.model),
            "resolved_device": str(self.device),
            "invertible_by_construction": self.arch.invertible,
        }

    def on_start(self, new_run: bool) -> None:
        if new_run:
            log_json({"mean": self.mean.tolist(), "std": self.std.tolist()}, "normalization.json")
        mlflow.set_tag("model", self.cfg.model)

    def step(self, forward: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = batch
        logits = forward(self.prepare(images, train=True))
        labels = labels.to(self.device, non_blocking=True)
        loss = F.cross_entropy(logits, labels)
        error = 100.0 * (logits.argmax(dim=1) != labels).float().mean()
        return loss, {"error_percent": error.detach()}  # read at log_every, not per step

    @torch.no_grad()
    def _error_and_loss(self, split: ImageSplit) -> tuple[float, float]:
        """Error (%) and mean loss on ``split``; under torchrun each rank scores every world_size-th batch."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # correct, summed loss (read once)
        batches = iterate_batches(split, self.cfg.eval_batch_size, shuffle=False)
        for index, (images, labels) in enumerate(batches):
            if index % self.ctx.world_size != self.ctx.rank:
                continue
            logits = self.model(self.prepare(images, train=False))
            labels = labels.to(self.device)
            totals[0] += (logits.argmax(dim=1) == labels).sum()
            totals[1] += F.cross_entropy(logits, labels, reduction="sum")
        self.model.train()
        correct, total_loss = sum_over_ranks(totals, self.ctx).tolist()
        return 100.0 * (1 - correct / len(split)), total_loss / len(split)

    def evaluate(self, epoch: int) -> dict[str, float]:
        metrics = {}
        validation = self.splits.validation
        if validation is not None:
            metrics["val/error_percent"], metrics["val/cross_entropy_nats"] = self._error_and_loss(validation)
        if validation is None or epoch == self.cfg.epochs:
            test = self._error_and_loss(self.splits.data.test)
            metrics["test/error_percent"], metrics["test/cross_entropy_nats"] = test
        return metrics

    def finalise(self, run_id: str, state: LoopState) -> str:
        step, results = state.step, state.model_results
        bound, certified = measure_invertibility(
            self.model, self.splits.data.test, self.prepare, self.mean, self.std, self.cfg, step
        )
        log_pyfunc_model(
            self.model,
            "classify",
            {
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "num_classes": self.splits.data.num_classes,
                "dataset": self.cfg.dataset,
            },
            self.splits.data.test.images[:2].numpy(),
            register_as=self.cfg.register_model,
            step=step,
            results=results,
        )
        return headline(results, bound, certified, self.cfg, self.splits.data.name, step)


def headline(
    results: Mapping[str, float], bound: float, certified: bool, cfg: ClassifyConfig, dataset: str, step: int
) -> str:
    """The run's result in a sentence (its description): test error, invertibility, the training."""
    error = results.get("test/error_percent")
    score = f"**test error {error:.2f} %** on {dataset}" if error is not None else f"trained on {dataset}"
    if certified:
        invertible = f"certified invertible (every block's Lipschitz bound <= {bound:.4f} < 1)"
    else:
        invertible = f"not invertible: a block's Lipschitz bound is {bound:.4g}" if cfg.model == "iresnet" else (
            f"{cfg.model}: not invertible by construction"
        )  # fmt: skip
    return f"{score} ({cfg.model}); {invertible}; {cfg.epochs} epochs, {step:,} steps"


def run(cfg: ClassifyConfig, *, on_epoch_end: EpochHook | None = None) -> str:
    """Train, evaluate and measure invertibility; returns the MLflow run id.

    ``on_epoch_end(epoch, metrics)`` sees each epoch's metrics (a sweep reports and prunes there). Under
    ``torchrun`` the ranks train data-parallel (see :mod:`pipeline.training.distributed`).
    """
    return run_training(cfg, ClassifyTask, on_epoch_end)


# --- command line -------------------------------------------------------------------------------
ENTRY = EntryPoint(ClassifyConfig, PRESETS, run, __doc__)
config_from_preset, config_for_resume, main = ENTRY.config_from_preset, ENTRY.config_for_resume, ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
