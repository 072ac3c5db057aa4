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
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import LogDetEstimator, make_estimator


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
    estimator: str = "power_series"
    n_terms: int = 5
    n_exact_terms: int = 2
    roulette: str = "geometric"
    roulette_p: float = 0.5
    roulette_rate: float = 2.0
    gradient: str = "neumann"  # same expected gradient as backprop, faster and without a graph per term
    n_probes: int = 1
    probe: str = "gaussian"

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
    inverse_tol: float = 1e-6  # atol = rtol on the per-sample residual
    inverse_method: str = "plain"  # or "anderson" (same tolerance, fewer evaluations of g)

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
    dataset: str = "digits-mnist5k"
    data_dir: str | None = None
    download: bool = False
    validation_fraction: float = 0.0  # > 0: evaluate on a held-out part of train (sweeps), test at the end


@dataclass(frozen=True)
class TrainingOptions:
    """The epoch loop of a training run (density, classify): its length, batches, rate, checkpoints and resume."""

    GROUP: ClassVar[str] = "training"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 0
    grad_clip: float = 0.0
    amp: bool = False
    log_every: int = 10
    resume: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """The process and the tracked run (every experiment)."""

    GROUP: ClassVar[str] = "run"
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads of this process; 0: the cores divided among the local workers
    deterministic: bool = False  # deterministic kernels (GPU): a resumed run then equals an uninterrupted one
    experiment_name: str | None = None  # None: the entry point's name
    run_name: str | None = None
    checkpoint_dir: str = str(PROJECT_ROOT / "checkpoints")
    progress: bool = True
    register_model: str | None = None  # a Model Registry name: the trained model becomes a new version of it
    log_system_metrics: bool = False  # MLflow's CPU/GPU/memory monitor beside the run's own metrics


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
    architecture: str = "quick"
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
