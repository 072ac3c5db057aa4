"""The sweep's configuration: what it may tune (:data:`TARGETS`: density or classify, each with its validation
objective and the second objective of the two-objective mode) and :class:`SweepConfig`, validated in one place
before a study or a run is touched."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from experiments import classify, density
from experiments.command_line import build_parser
from experiments.config import (
    check_common,
    option_applies,
    option_types,
)
from experiments.search_space import (
    SERIES_TERMS_OPTION,
    check_space,
    default_space,
    extreme_values,
    read_space_file,
)
from experiments.study import (
    make_pruner,
    make_sampler,
)
from experiments.tracking import (
    metric_value,
)
from experiments.tracking_store import PROJECT_ROOT
from pipeline.fields import documented

DEFAULT_OVERRIDES = {"density": "epochs=2 eval_max_images=500", "classify": "epochs=2"}  # short trials


@dataclass(frozen=True)
class Target:
    module: Any
    config_cls: type[Any]
    metric: str  # the validation metric to minimise (a run's metric name: the study's objective is named after it)
    # the two-objective mode: its name, the second objective's name, its direction, how a run's metrics give it
    second: tuple[str, str, str, Callable[[dict], float]]


def read_metric(metrics: dict, name: str) -> float:
    value = metric_value(metrics, name)
    if value is None:
        raise KeyError(f"the trial's run logged no {name}")
    return float(value)


TARGETS = {
    "density": Target(
        density,
        density.DensityConfig,
        "val/bpd",
        ("bpd-time", "train/epoch_seconds", "minimize", lambda m: read_metric(m, "train/epoch_seconds")),
    ),
    "classify": Target(
        classify,
        classify.ClassifyConfig,
        "val/error_percent",
        (
            "error-margin",
            "lipschitz/margin",  # 1 - the largest certified block Lipschitz bound: how far from non-invertible
            "maximize",
            lambda m: 1.0 - read_metric(m, "lipschitz/max_block_certified"),
        ),
    ),
}


@dataclass(frozen=True)
class SweepConfig:
    """The options of ``experiments.sweep`` (the entry point: its presets, its usage line, its runs' tags)."""

    ENTRY_POINT_MODULE: ClassVar[str] = "experiments.sweep"
    preset: str = documented("quick", "the sweep's preset (PRESETS)")
    target: str = documented("density", "entry point each trial trains: density or classify")
    target_preset: str = documented("quick", "the target's preset every trial starts from")
    target_overrides: str | None = documented(
        None, "'option=value ...' applied to every trial; unset: short trials (density: epochs=2 eval_max_images=500)"
    )
    lipschitz: str | None = documented(None, "every trial's Lipschitz mode, soft or strict; unset: the target's")
    study_name: str = documented("iresnet-sweep", "Optuna study name; workers on the same name share the study")
    storage: str = documented("", "Optuna storage: a SQLAlchemy URL, journal:PATH, or '' for ./optuna.db (SQLite)")
    n_trials: int = documented(8, "trials in total, across every worker on the study (>= 1)")
    timeout: float = documented(0.0, "seconds this worker runs trials (>= 0); 0: no limit")
    worker_trials: int = documented(
        0, "trials this worker runs at most (>= 0; e.g. 1 per job of an array); 0: no limit"
    )
    sampler: str = documented("tpe", "tpe or random")
    pruner: str = documented("median", "median, hyperband or none (single objective only)")
    objective: str = documented(
        "single", "single (the validation metric), or two: bpd-time (density), error-margin (classify)"
    )
    space_file: str | None = documented(
        None, "YAML or JSON search space (option: {type, low, high[, log]}); unset: c, terms, power iterations"
    )
    tune_lr: bool = documented(False, "add the learning rate (log scale, 1e-4 to 0.1) to the default space")
    validation_fraction: float = documented(
        0.1, "share of the training images each trial is scored on, in (0, 1); the test split is never used"
    )
    seed: int = documented(0, "seed of the sampler (each trial's sampler is seeded from it and the trial number)")
    threads: int = documented(0, "CPU threads of this process (1 to the machine's cores); 0: the cores shared out")
    experiment_name: str = documented("sweep", "MLflow experiment of the parent run (trials are its nested runs)")
    run_name: str | None = documented(None, "MLflow name of the parent run; unset: sweep-STUDY")
    checkpoint_dir: str = documented(str(PROJECT_ROOT / "checkpoints"), "folder of the trials' checkpoints")
    progress: bool = documented(False, "progress bars of the trials on the console")
    heartbeat_interval: int = documented(10, "seconds between a running trial's heartbeats (database storages, >= 1)")
    grace_period: int = documented(
        0, "seconds without a heartbeat before a trial counts as dead (>= 0); 0: 3 x heartbeat_interval"
    )
    retry_dead_trials: bool = documented(True, "try a dead or stopped worker's parameters once more")

    def __post_init__(self) -> None:
        check_common(self)
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {sorted(TARGETS)}")
        target = TARGETS[self.target]
        if self.target_preset not in target.module.PRESETS:
            raise ValueError(f"unknown {self.target} preset {self.target_preset!r}")
        if self.objective not in ("single", target.second[0]):
            raise ValueError(f"objective for {self.target} must be 'single' or {target.second[0]!r}")
        make_sampler(self.sampler, self.seed)  # each validates its name
        make_pruner(self.pruner, multi_objective=False)
        if self.n_trials < 1 or self.timeout < 0 or self.worker_trials < 0:
            raise ValueError("n_trials must be >= 1, timeout >= 0 and worker_trials >= 0")
        if self.heartbeat_interval < 1 or self.grace_period < 0:
            raise ValueError("heartbeat_interval must be >= 1 s and grace_period >= 0")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in (0, 1): the objective is a held-out score, "
                f"got {self.validation_fraction}"
            )
        # the overrides, and every value the space can produce, must make a valid target configuration:
        # refused now, not in every trial (ranges are checked at both ends, categoricals choice by choice)
        space = self.space()
        base = self.base_overrides()
        target.module.config_from_preset(self.target_preset, **base)
        for name, spec in space.items():
            for value in extreme_values(spec):
                try:
                    target.module.config_from_preset(self.target_preset, **{**base, name: value})
                except (ValueError, TypeError) as exc:
                    raise ValueError(
                        f"search-space value {name}={value!r} is invalid for {self.target}: {exc}"
                    ) from None
        self._check_space_applies(space, base)

    def _check_space_applies(self, space: dict[str, dict], base: dict[str, Any]) -> None:
        """Every searched option changes what a trial trains: ``n_terms`` with the roulette estimator would be a
        dimension the sampler explores for nothing (refused, naming the option that does apply where there is one)."""
        target = TARGETS[self.target]
        choices = [
            [(name, value) for value in spec["choices"]]
            for name, spec in space.items()
            if spec["type"] == "categorical"
        ]
        combinations = [dict(c) for c in itertools.product(*choices)][:256]
        configs = [target.module.config_from_preset(self.target_preset, **{**base, **c}) for c in combinations]
        for name in space:
            if not any(option_applies(cfg, name) for cfg in configs):
                estimator = getattr(configs[0], "estimator", None)
                instead = SERIES_TERMS_OPTION.get(estimator or "") if name in SERIES_TERMS_OPTION.values() else None
                raise ValueError(
                    f"search-space parameter {name!r} has no effect on {self.target} preset {self.target_preset!r}"
                    + (f" with estimator={estimator}" if estimator else "")
                    + (f"; search {instead!r} instead" if instead and instead != name else "")
                )

    @property
    def multi_objective(self) -> bool:
        return self.objective != "single"

    def space(self) -> dict[str, dict]:
        """The search space: ``space_file``'s, else the default (with the rate if ``tune_lr``), checked."""
        if self.space_file:
            space = read_space_file(Path(self.space_file))
        else:
            base = TARGETS[self.target].module.config_from_preset(self.target_preset, **self.base_overrides())
            space = default_space(estimator=getattr(base, "estimator", None), tune_lr=self.tune_lr)
        check_space(space, set(option_types(TARGETS[self.target].config_cls)), self.target)
        return space

    def base_overrides(self) -> dict[str, Any]:
        """``target_overrides`` parsed with the target's own option types."""
        argv = []
        text = DEFAULT_OVERRIDES[self.target] if self.target_overrides is None else self.target_overrides
        for item in text.split():
            if "=" not in item:
                raise ValueError(f"target_overrides entries look like field=value, got {item!r}")
            key, value = item.split("=", 1)
            argv += [f"--{key.replace('_', '-')}", value]
        target = TARGETS[self.target]
        parser = build_parser(target.config_cls, target.module.PRESETS, None)
        try:
            parsed = vars(parser.parse_args(argv))
        except SystemExit:
            raise ValueError(f"bad target_overrides {text!r} for {self.target}") from None
        parsed.pop("preset")
        parsed.pop("_preset_given", None)
        chosen = {} if self.lipschitz is None else {"lipschitz": self.lipschitz}
        return chosen | {k: v for k, v in parsed.items() if v is not None}
