"""The option groups an entry point's config is composed of, each option declared once.

``DataOptions``, ``TrainingOptions`` and ``RunOptions`` are shared by the training entry points,
``EstimatorOptions`` (the log-det estimator) and ``InverseOptions`` (the inverse) by those that need them, and
``ArchitectureOptions`` is the model group: a preset of the library's architecture dataclass with some of its
fields replaced. Each group names itself (``GROUP``) for ``--help``, the MLproject and a run's ``config.json``; the
machinery that turns groups into a command line, presets and logged configurations is :mod:`experiments.config`.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from experiments.tracking_store import PROJECT_ROOT
from pipeline.fields import documented, when
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import LogDetEstimator, make_estimator

SERIES = ("power_series", "russian_roulette")  # the estimators with Hutchinson probes and a series gradient


@dataclass(frozen=True)
class EstimatorOptions:
    """The log-det estimator of a run, as flat options (fields of the density and toy configs).

    ``estimator``: ``power_series`` (the paper: ``n_terms``, biased by the truncation),
    ``russian_roulette`` (unbiased: ``n_exact_terms`` plus a ``roulette``-distributed number more) or
    ``exact`` (brute force, low dimensions). ``gradient``: ``neumann`` (the default: memory-saving and
    faster, the same expected gradient) or ``backprop`` through the series (the paper's formulation).
    ``n_probes`` Hutchinson probes of kind ``probe``.
    """

    GROUP: ClassVar[str] = "estimator"
    estimator: str = documented(
        "power_series", "training log-det: power_series (the paper), russian_roulette (unbiased) or exact"
    )
    n_terms: int = documented(5, "terms of the power series (>= 1)", applies=when("estimator", "power_series"))
    n_exact_terms: int = documented(
        2,
        "terms always computed before the roulette's random ones (>= 0)",
        applies=when("estimator", "russian_roulette"),
    )
    roulette: str = documented(
        "geometric", "distribution of the roulette's extra terms: geometric or poisson",
        applies=when("estimator", "russian_roulette"),
    )  # fmt: skip
    roulette_p: float = documented(
        0.5, "stopping probability per term of the geometric roulette, in (0, 1)",
        applies=lambda o: o["estimator"] == "russian_roulette" and o["roulette"] == "geometric",
    )  # fmt: skip
    roulette_rate: float = documented(
        2.0, "mean number of extra terms of the Poisson roulette (> 0)",
        applies=lambda o: o["estimator"] == "russian_roulette" and o["roulette"] == "poisson",
    )  # fmt: skip
    # the same expected gradient as backprop, faster and without a graph per term
    gradient: str = documented(
        "neumann", "gradient of the series: neumann (memory-saving) or backprop (through every term)",
        applies=when("estimator", *SERIES),
    )  # fmt: skip
    n_probes: int = documented(1, "Hutchinson probes per image and step (>= 1)", applies=when("estimator", *SERIES))
    probe: str = documented(
        "gaussian", "the probes' distribution: gaussian or rademacher", applies=when("estimator", *SERIES)
    )

    def training_estimator(self) -> LogDetEstimator:
        """The estimator these options name (the library validates every option, with a clear message)."""
        if self.estimator == "exact":
            return make_estimator("exact")
        series = dict(n_probes=self.n_probes, probe=self.probe, gradient=self.gradient)
        if self.estimator == "power_series":
            return make_estimator("power_series", n_terms=self.n_terms, **series)
        if self.estimator == "russian_roulette":
            return make_estimator(
                "russian_roulette",
                n_exact_terms=self.n_exact_terms,
                distribution=self.roulette,
                p=self.roulette_p,
                rate=self.roulette_rate,
                **series,
            )
        return make_estimator(self.estimator)  # raises, naming the estimators there are


@dataclass(frozen=True)
class InverseOptions:
    """How a run inverts its blocks (reconstructions, samples): fields of the density and classify configs."""

    GROUP: ClassVar[str] = "inverse"
    inverse_tol: float = documented(
        1e-6, "tolerance of the fixed-point inverse on each sample's residual (atol = rtol)"
    )
    # anderson: the same tolerance, fewer evaluations of g
    inverse_method: str = documented("plain", "fixed-point iteration of the inverse: plain or anderson")

    def inverse_config(self) -> FixedPointConfig:
        """The inverse's settings (validated by :class:`FixedPointConfig`)."""
        if not self.inverse_tol > 0:
            raise ValueError(f"inverse_tol must be > 0, got {self.inverse_tol}")
        return FixedPointConfig(
            atol=self.inverse_tol, rtol=self.inverse_tol, max_iterations=200, method=self.inverse_method
        )


@dataclass(frozen=True)
class DataOptions:
    """The images a training run reads (density, classify)."""

    GROUP: ClassVar[str] = "data"
    dataset: str = documented(
        "digits-mnist5k", "the images (pipeline.data.DATASETS: digits-mnist5k, mnist, cifar10, ...)"
    )
    data_dir: str | None = documented(
        None, "folder holding (or receiving, with download) a file-based dataset: mnist, cifar10, svhn, ..."
    )
    download: bool = documented(
        False, "download a missing dataset into data_dir (torchvision)", applies=lambda o: o["data_dir"] is not None
    )
    validation_fraction: float = documented(
        0.0, "share of the training images held out for validation, in [0, 1); the test split is scored at the end"
    )


@dataclass(frozen=True)
class TrainingOptions:
    """The epoch loop of a training run (density, classify): its length, batches, rate, checkpoints and resume."""

    GROUP: ClassVar[str] = "training"
    epochs: int = documented(10, "passes over the training images (>= 1)")
    batch_size: int = documented(64, "images per optimizer step, over all processes (>= 1)")
    lr: float = documented(3e-3, "peak learning rate (> 0)")
    warmup_steps: int = documented(0, "optimizer steps of linear warm-up to lr (>= 0)")
    grad_clip: float = documented(0.0, "largest global gradient norm (> 0), or 0: no clipping")
    amp: bool = documented(False, "bfloat16 autocast of the branches on a GPU (guarantees stay in float32)")
    compile: bool = documented(
        False, "torch.compile the training step (the power-series step traces whole; on a CPU no gain measured)"
    )
    log_every: int = documented(10, "optimizer steps between logged training metrics (>= 1)")
    tracking_outage_s: float = documented(
        600.0, "seconds training goes on while the tracking store takes no metrics, then stops to be resumed (> 0)"
    )
    resume: str | None = documented(None, "run id to continue from its last checkpoint (its configuration is kept)")


@dataclass(frozen=True)
class RunOptions:
    """The process and the tracked run (every experiment)."""

    GROUP: ClassVar[str] = "run"
    seed: int = documented(0, "seed of torch, numpy and Python (>= 0)")
    device: str = documented("auto", "auto (a GPU if there is one), cpu, cuda or cuda:N")
    threads: int = documented(0, "CPU threads of this process (1 to the machine's cores); 0: the cores shared out")
    # a resumed run then equals an uninterrupted one on a GPU too
    deterministic: bool = documented(False, "deterministic GPU kernels (cuDNN, cuBLAS)")
    experiment_name: str | None = documented(None, "MLflow experiment of the run; unset: the entry point's name")
    run_name: str | None = documented(None, "MLflow run name; unset: the entry point, preset and changed options")
    checkpoint_dir: str = documented(
        str(PROJECT_ROOT / "checkpoints"), "folder of the runs' checkpoints (RUN_ID/last.pt)"
    )
    progress: bool = documented(True, "progress bars on the console")
    register_model: str | None = documented(
        None, "Model Registry name: the trained model becomes a new version of it; unset: not registered"
    )
    log_system_metrics: bool = documented(False, "MLflow's CPU, GPU and memory monitor (system/* metrics)")


@dataclass(frozen=True)
class ArchitectureOptions:
    """The model: a preset of the library's architecture dataclass (``architecture``) with some fields replaced.

    An entry point sets :attr:`ARCHITECTURES` (name -> architecture instance) and :attr:`FROM_DATA` (the fields the
    data decides, e.g. ``input_shape``); every other field of the architecture class is an option of the entry
    point, declared only there.
    """

    GROUP: ClassVar[str] = "model"
    ARCHITECTURES: ClassVar[Mapping[str, Any]] = {}
    FROM_DATA: ClassVar[tuple[str, ...]] = ("input_shape",)
    architecture: str = documented("quick", "the model preset whose fields the model options replace")
    architecture_overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def architecture_types(cls) -> dict[str, Any]:
        """The architecture fields that are options, with their declared types."""
        arch_cls = type(next(iter(cls.ARCHITECTURES.values())))
        hints = typing.get_type_hints(arch_cls)
        return {f.name: hints[f.name] for f in fields(arch_cls) if f.name not in cls.FROM_DATA}

    def _check_architecture(self) -> None:
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {sorted(self.ARCHITECTURES)}")
        unknown = sorted(set(self.architecture_overrides) - set(self.architecture_types()))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a field of the {self.architecture!r} architecture")
        object.__setattr__(self, "architecture_overrides", dict(self.architecture_overrides))

    def architecture_option(self, name: str) -> Any:
        """The value of an architecture field for this run: its override, or the preset's."""
        if name in self.architecture_overrides:
            return self.architecture_overrides[name]
        return getattr(self.ARCHITECTURES[self.architecture], name)

    def resolved_architecture(self, **from_data: Any) -> Any:
        """The architecture preset with the overrides and the data's fields (validated by the library)."""
        return replace(self.ARCHITECTURES[self.architecture], **{**from_data, **self.architecture_overrides})
