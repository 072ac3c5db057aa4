"""``mlflow run . -e sweep``: an Optuna study over the Lipschitz coefficient, series terms and power iterations.

    python -m experiments.sweep --target density --n-trials 20
    python -m experiments.sweep --target classify --objective error-margin --n-trials 30
    python -m experiments.sweep --space-file space.yaml --target-overrides "epochs=3 eval_max_images=500"
    python -m experiments.sweep --storage journal:sweep.journal --study-name s1   # run in N terminals

Each trial trains the target on the training set minus a held-out validation split and is scored on
that split (never on the test set). One MLflow parent run per invocation; every trial is a nested
child run. Pruned trials end KILLED, trials that raise (or hit a NaN) end FAILED and the study goes on.

Several workers on one study (several processes, or machines sharing a database):

* ``--n-trials`` is exact across workers: a trial claims a slot when it starts; a claim beyond the
  budget (two workers starting the last slot at once) never trains and is recorded FAIL with the user
  attribute ``excess_claim``.
* The trial and its MLflow child run are linked when the run starts (trial user attributes
  ``mlflow_run_id`` / ``mlflow_parent_run_id``, run tags ``optuna_trial`` / ``optuna_study``).
* With a database storage (the default SQLite file, or PostgreSQL, ...) each trial sends heartbeats
  (``--heartbeat-interval``); a trial whose worker died (no heartbeat for ``--grace-period``) is
  marked FAIL by the next worker, its MLflow child and parent runs FAILED with a ``failure`` tag saying
  so, its slot is freed (and, with ``--retry-dead-trials``, its parameters are tried once more), and
  the study goes on. A journal file has no heartbeats: a killed worker's trial stays RUNNING.
* A worker whose budget is spent waits while other workers' trials still run, so that a slot freed
  by a dead worker is filled: the study ends with ``--n-trials`` trials done.
* A study in which no trial completed ends FAILED (exit 2).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from experiments import classify, density
from experiments.config import build_parser, check_common
from experiments.runner import EntryPoint
from experiments.tracking import (
    PROJECT_ROOT,
    RunStopped,
    log_config,
    log_json,
    log_params_flat,
    on_run_start,
    tracked_run,
    wait_for_database_on_connect,
)

log = logging.getLogger("experiments.sweep")

DEFAULT_SPACE: dict[str, dict] = {
    "coeff": {"type": "float", "low": 0.5, "high": 0.97},
    "n_terms": {"type": "int", "low": 1, "high": 10},  # density only (the classifier has no log-det)
    "n_power_iterations": {"type": "int", "low": 1, "high": 10},
}
LR_SPACE = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
DEFAULT_OVERRIDES = {"density": "epochs=2 eval_max_images=500", "classify": "epochs=2"}  # short trials


@dataclass(frozen=True)
class Target:
    module: Any
    config_cls: type
    metric: str  # the validation metric to minimise
    # multi-objective mode: (name, second metric, its direction, how to read it from the run's metrics)
    second: tuple[str, str, Callable[[dict], float]]


TARGETS = {
    "density": Target(
        density, density.DensityConfig, "val_bpd", ("bpd-time", "minimize", lambda m: m["epoch_seconds"])
    ),
    "classify": Target(
        classify,
        classify.ClassifyConfig,
        "val_error",
        ("error-margin", "maximize", lambda m: 1.0 - m["max_block_lipschitz"]),
    ),
}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class SweepConfig:
    preset: str = "quick"
    target: str = "density"
    target_preset: str = "quick"
    target_overrides: str | None = None  # "field=value ..." applied to every trial (None: DEFAULT_OVERRIDES)
    lipschitz: str | None = None  # every trial's Lipschitz mode (None: the target's; "strict": norms <= c always)
    study_name: str = "iresnet-sweep"
    storage: str = ""  # "": sqlite:///<project>/optuna.db; "journal:PATH"; or any SQLAlchemy URL
    n_trials: int = 8  # in total, across all workers on the study
    timeout: float = 0.0  # seconds for this worker; 0: no limit
    sampler: str = "tpe"
    pruner: str = "median"
    objective: str = "single"  # or the target's two-objective mode: bpd-time (density), error-margin (classify)
    space_file: str | None = None
    tune_lr: bool = False
    validation_fraction: float = 0.1
    seed: int = 0
    threads: int = 0  # CPU threads of this process; 0: the cores divided among the local workers
    experiment_name: str = "sweep"
    run_name: str | None = None
    checkpoint_dir: str = str(PROJECT_ROOT / "checkpoints")
    progress: bool = False
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats (database storages)
    grace_period: int = 0  # seconds without a heartbeat before a trial counts as dead; 0: 3 x the interval
    retry_dead_trials: bool = True  # try a dead worker's parameters once more (recorded: retried_trial_number)

    def __post_init__(self) -> None:
        check_common(self)
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {sorted(TARGETS)}")
        target = TARGETS[self.target]
        if self.target_preset not in target.module.PRESETS:
            raise ValueError(f"unknown {self.target} preset {self.target_preset!r}")
        if self.objective not in ("single", target.second[0]):
            raise ValueError(f"objective for {self.target} must be 'single' or {target.second[0]!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r}; choose one of {PRUNERS}")
        if self.n_trials < 1 or self.timeout < 0:
            raise ValueError("n_trials must be >= 1 and timeout >= 0")
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
            values = spec["choices"] if spec["type"] == "categorical" else (spec["low"], spec["high"])
            for value in values:
                try:
                    target.module.config_from_preset(self.target_preset, **{**base, name: value})
                except (ValueError, TypeError) as exc:
                    raise ValueError(
                        f"search-space value {name}={value!r} is invalid for {self.target}: {exc}"
                    ) from None

    @property
    def multi_objective(self) -> bool:
        return self.objective != "single"

    def space(self) -> dict[str, dict]:
        if self.space_file:
            path = Path(self.space_file)
            if not path.exists():
                raise ValueError(f"space file {path} does not exist")
            text = path.read_text()
            try:
                space = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                raise ValueError(
                    f"space file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                    f"{' '.join(str(exc).split())}"
                ) from None
            if not isinstance(space, dict) or not space:
                raise ValueError(
                    f"space file {path} must map parameter names to ranges, e.g. "
                    f"'coeff: {{type: float, low: 0.5, high: 0.97}}'; got {type(space).__name__}"
                )
        else:
            space = dict(DEFAULT_SPACE)
            if self.target != "density":
                space.pop("n_terms")
            if self.tune_lr:
                space["lr"] = LR_SPACE
        fields = set(TARGETS[self.target].config_cls.__dataclass_fields__)
        for name, spec in space.items():
            if name not in fields:
                raise ValueError(f"search-space parameter {name!r} is not an option of {self.target}")
            if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
                raise ValueError(f"search-space entry {name!r} needs type float, int or categorical: {spec!r}")
            if spec["type"] == "categorical":
                if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                    raise ValueError(f"categorical {name!r} needs a non-empty list of choices, got {spec!r}")
                continue
            missing = [key for key in ("low", "high") if key not in spec]
            if missing:
                raise ValueError(f"search-space entry {name!r} needs {' and '.join(missing)}: {spec!r}")
            if not all(isinstance(spec[k], int | float) and not isinstance(spec[k], bool) for k in ("low", "high")):
                raise ValueError(f"{name!r}: low and high must be numbers, got {spec!r}")
            if spec["type"] == "int" and not all(float(spec[k]).is_integer() for k in ("low", "high")):
                raise ValueError(f"{name!r} is an int parameter: low and high must be whole numbers, got {spec!r}")
            if not spec["low"] < spec["high"]:
                raise ValueError(f"{name!r}: need low < high, got {spec}")
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
        chosen = {} if self.lipschitz is None else {"lipschitz": self.lipschitz}
        return chosen | {k: v for k, v in parsed.items() if v is not None}


PRESETS: dict[str, dict] = {
    "quick": {},
    "density-paper-mnist": dict(
        target="density", target_preset="paper-mnist", target_overrides="epochs=20", n_trials=50, pruner="hyperband"
    ),
    "classify-paper-cifar10": dict(
        target="classify", target_preset="paper-cifar10", target_overrides="epochs=60", n_trials=50, pruner="hyperband"
    ),
}


class PrunedRun(optuna.TrialPruned, RunStopped):
    """Optuna sees a pruned trial; MLflow marks the child run KILLED."""


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params


STORAGE_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # ~30 s: a database restart or a failover


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that outlives a database restart.

    Pooled connections are checked before use (``pool_pre_ping``: a restart leaves them dead), and a call
    that fails because the server cannot be reached is retried with backoff (:data:`STORAGE_RETRY_DELAYS_S`).
    A heartbeat that fails is logged and the next one tried, so the heartbeat thread never dies silently (a
    trial without heartbeats would be failed by the other workers while it still trains). Optuna's errors
    about the study itself (a finished trial, a missing study) are not retried.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        wait_for_database_on_connect()  # a cut connection is replaced once the server is back
        engine_kwargs = {"pool_pre_ping": True, **kwargs.pop("engine_kwargs", {})}
        # workers starting together race on creating the schema: a loser retries and finds it complete
        _retrying(super().__init__, also=_schema_race)(url, engine_kwargs=engine_kwargs, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:  # the next beat tries again; the grace period is the limit
            log.warning("heartbeat of trial %d not recorded (%s); retrying at the next beat", trial_id, exc)


def _unreachable(exc: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(exc, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError))


def _schema_race(exc: BaseException) -> bool:
    import sqlalchemy.exc

    return isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError))


def _retrying(method: Callable, also: Callable[[BaseException], bool] = lambda exc: False) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        for delay in (*STORAGE_RETRY_DELAYS_S, None):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if delay is None or not (_unreachable(exc) or also(exc)):
                    raise
                log.warning(
                    "study storage unreachable (%s: %s); retrying in %.0f s",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200],
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


# every public call is one transaction: retried whole (private helpers run inside a caller's session)
for _name, _method in vars(optuna.storages.RDBStorage).items():
    if inspect.isfunction(_method) and not _name.startswith("_") and _name != "record_heartbeat":
        setattr(ReconnectingRDBStorage, _name, _retrying(_method))
ReconnectingRDBStorage._get_stale_trial_ids = _retrying(optuna.storages.RDBStorage._get_stale_trial_ids)


def make_storage(
    spec: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_dead_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The study's storage: a journal file (``journal:PATH``), or a database URL (default: the project's
    SQLite file) with heartbeats every ``heartbeat_interval`` s when given, ``on_dead_trial`` called for a
    trial found without heartbeat for ``grace_period`` s."""
    try:
        if spec.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
        url = spec or f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"
        storage_class = optuna.storages.RDBStorage if url.startswith("sqlite") else ReconnectingRDBStorage
        if heartbeat_interval is None:
            return storage_class(url)
        with warnings.catch_warnings():  # heartbeats are flagged experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return storage_class(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period or 3 * heartbeat_interval,
                heartbeat_stale_trial_callback=on_dead_trial,
            )
    except Exception as exc:  # an unknown scheme, a missing driver, a file that is no database, a dead server
        shown = f"{spec.split('://', 1)[0]}://***@{spec.rsplit('@', 1)[1]}" if "@" in spec else spec or "(default)"
        raise ValueError(
            f"the study storage {shown} cannot be opened ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "use journal:PATH, sqlite:///PATH or a database URL such as postgresql+psycopg://user@host/db"
        ) from None


class ExcessClaim(RuntimeError):
    """A trial started after the study's budget was already claimed by other workers; it does not train."""


def counts_toward_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Running or done trials, and failures raised by the objective; not excess claims, not dead workers."""
    if trial.user_attrs.get("excess_claim"):
        return False
    if trial.state == TrialState.FAIL:
        return bool(trial.user_attrs.get("worker_done"))  # else its worker died: the slot is free again
    return trial.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Samples each trial with a sampler of its own, seeded from ``(seed, trial number)``.

    Trial numbers are handed out by the storage, one per trial, so workers of one study that start from the same
    ``--seed`` draw different parameters (a sampler seeded with ``seed`` alone gives each worker the same stream:
    two workers drew the same configurations), while one worker alone is reproducible from ``--seed``. The
    samplers here (TPE, random) keep no state between trials but their random stream: they read the history
    from the study.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make, self._seed = make, seed
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def _for(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._current is None or self._current[0] != trial.number:
            import numpy as np

            seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            self._current = (trial.number, self._make(seed))
        return self._current[1]

    def infer_relative_search_space(self, study, trial):  # type: ignore[no-untyped-def]
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # type: ignore[no-untyped-def]
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # type: ignore[no-untyped-def]
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):  # type: ignore[no-untyped-def]
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):  # type: ignore[no-untyped-def]
        self._for(trial).after_trial(study, trial, state, values)


def _sampler(cfg: SweepConfig) -> optuna.samplers.BaseSampler:
    make = optuna.samplers.RandomSampler if cfg.sampler == "random" else optuna.samplers.TPESampler
    return TrialSeededSampler(lambda seed: make(seed=seed), cfg.seed)


def _pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    if cfg.multi_objective or cfg.pruner == "none":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def make_objective(
    cfg: SweepConfig, running: list[int] | None = None
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """The study's objective; ``running`` (if given) collects the number of each trial as it starts."""
    running = [] if running is None else running
    target = TARGETS[cfg.target]
    space, base = cfg.space(), cfg.base_overrides()
    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        counted = sorted(t.number for t in trial.study.get_trials(deepcopy=False) if counts_toward_budget(t))
        if trial.number in counted and counted.index(trial.number) >= cfg.n_trials:
            trial.set_user_attr("excess_claim", True)
            raise ExcessClaim(f"the study's {cfg.n_trials} trials were already claimed by other workers")
        running.append(trial.number)
        try:
            value = run_trial(trial)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL; no worker_done frees its slot
            raise
        except Exception as exc:
            if not isinstance(exc, optuna.TrialPruned):
                trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:2000])
            trial.set_user_attr("worker_done", True)  # an outcome of the trial's own (a dead worker's lacks it)
            raise
        trial.set_user_attr("worker_done", True)
        return value

    def run_trial(trial: optuna.Trial) -> float | tuple[float, float]:
        params = suggest(trial, space)
        trial_cfg = target.module.config_from_preset(
            cfg.target_preset,
            **{**base, **params},
            validation_fraction=cfg.validation_fraction,
            run_name=f"trial-{trial.number}",
            progress=cfg.progress,
            checkpoint_dir=cfg.checkpoint_dir,
            **({"eval_every": 1} if cfg.target == "density" else {}),
        )

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if target.metric in metrics and not cfg.multi_objective:
                trial.report(metrics[target.metric], epoch)
                if trial.should_prune():
                    raise PrunedRun(f"pruned at epoch {epoch} ({target.metric}={metrics[target.metric]:.4g})")

        parent = mlflow.active_run()
        trial.set_user_attr("mlflow_parent_run_id", parent.info.run_id)

        def link(run_id: str) -> None:  # at the child run's start: a worker dying mid-trial leaves both matched
            client.set_tag(run_id, "optuna_trial", trial.number)
            client.set_tag(run_id, "optuna_study", cfg.study_name)
            trial.set_user_attr("mlflow_run_id", run_id)

        with on_run_start(link):
            run_id = target.module.run(trial_cfg, on_epoch_end=report)
        metrics = client.get_run(run_id).data.metrics
        value = metrics[target.metric]
        if not math.isfinite(value):
            raise FloatingPointError(f"{target.metric} is {value}")
        if cfg.multi_objective:
            return value, target.second[2](metrics)
        return value

    return objective


def _log_study_figures(study: optuna.Study, cfg: SweepConfig, out: Path) -> None:
    import optuna.visualization.matplotlib as ovm

    from pipeline.plotting import save_figure

    target = TARGETS[cfg.target]
    names = [target.metric] + ([target.second[0].split("-")[1]] if cfg.multi_objective else [])
    plots: dict[str, Callable[[], Any]] = {}
    if cfg.multi_objective:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
        for i, name in enumerate(names):
            plots[f"history_{name}"] = lambda i=i, name=name: ovm.plot_optimization_history(
                study, target=lambda t: t.values[i], target_name=name
            )
    else:
        plots["history"] = lambda: ovm.plot_optimization_history(study, target_name=target.metric)
        plots["importances"] = lambda: ovm.plot_param_importances(study)
        plots["contour"] = lambda: ovm.plot_contour(study, params=["coeff", "n_power_iterations"])
    for name, make in plots.items():
        try:
            with warnings.catch_warnings():  # Optuna flags its matplotlib plots as experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = make()
        except Exception as exc:
            log.warning("skipped the %s figure: %s", name, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        save_figure(fig, out / f"{name}.png")


def _dead_trial_handler(cfg: SweepConfig) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    with warnings.catch_warnings():  # experimental in Optuna since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1) if cfg.retry_dead_trials else None

    def on_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = (
            f"sweep worker died: trial {trial.number} of study {cfg.study_name!r} sent no heartbeat for "
            f"{cfg.grace_period or 3 * cfg.heartbeat_interval} s"
        )
        log.warning("%s; marked FAIL%s", reason, ", retried once" if retry else "")
        client = MlflowClient()
        for key in ("mlflow_run_id", "mlflow_parent_run_id"):
            run_id = trial.user_attrs.get(key)
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
                client.set_tag(run_id, "failure", reason)
        if retry is not None:
            retry(study, trial)

    return on_dead_trial


def run(cfg: SweepConfig) -> str:
    """Run this worker's share of the study under one MLflow parent run; returns its run id."""
    journal = cfg.storage.startswith("journal:")
    storage = make_storage(
        cfg.storage,
        heartbeat_interval=None if journal else cfg.heartbeat_interval,
        grace_period=cfg.grace_period,
        on_dead_trial=_dead_trial_handler(cfg),
    )
    if journal:
        log.warning("a journal storage has no heartbeats: a worker killed mid-trial leaves that trial RUNNING")
    directions = ["minimize", TARGETS[cfg.target].second[1]] if cfg.multi_objective else ["minimize"]
    study = optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        load_if_exists=True,
        directions=directions,
        sampler=_sampler(cfg),
        pruner=_pruner(cfg),
    )
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ValueError(
            f"study {cfg.study_name!r} exists with directions {[d.name.lower() for d in study.directions]}, not "
            f"{directions} (objective {cfg.objective!r}); use the study's objective or another --study-name"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tracked_run(cfg.experiment_name, run_name=cfg.run_name or f"sweep-{cfg.study_name}") as parent:
        log_config(cfg)
        log_json(cfg.space(), "search_space.json")
        mlflow.set_tag("optuna_study", cfg.study_name)
        _optimize(study, cfg, storage)
        _log_study_summary(study, cfg)
        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            failure = next((t.user_attrs["failure"] for t in trials if t.user_attrs.get("failure")), "")
            raise ValueError(
                f"no trial of study {cfg.study_name!r} completed" + (f"; first failure: {failure}" if failure else "")
            )
    return parent.info.run_id


class _NoTracebackForStops(logging.Filter):
    """Optuna logs a trial cut by Ctrl-C or SIGTERM as failed, with a traceback; a stop is no error: the line stays,
    the traceback goes (the entry point says what was stopped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            record.exc_info = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoTracebackForStops())


def _optimize(study: optuna.Study, cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> None:
    """Claim and run trials until the study holds ``n_trials`` (exact across workers; see the module doc)."""
    import time

    from optuna.storages._heartbeat import is_heartbeat_enabled

    running: list[int] = []
    objective = make_objective(cfg, running)
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else math.inf
    heartbeats = is_heartbeat_enabled(storage)
    while time.monotonic() < deadline:
        if heartbeats:
            with warnings.catch_warnings():  # Optuna flags it experimental (since 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        counted = [t for t in trials if counts_toward_budget(t)]
        if len(counted) < cfg.n_trials or any(t.state == TrialState.WAITING for t in trials):
            try:
                study.optimize(
                    objective,
                    n_trials=1,
                    timeout=None if math.isinf(deadline) else max(deadline - time.monotonic(), 0.0),
                    catch=(Exception,),  # a failing trial is recorded FAILED; the study goes on
                )
            except KeyboardInterrupt as exc:
                exc.stop_hint = _stopped_trial(study, cfg, running)  # type: ignore[attr-defined]
                raise
        elif heartbeats and any(t.state == TrialState.RUNNING for t in counted):
            time.sleep(cfg.heartbeat_interval)  # another worker's trial runs; if that worker dies, its slot frees
        else:
            return


def _stopped_trial(study: optuna.Study, cfg: SweepConfig, running: list[int]) -> str:
    """After Ctrl-C or SIGTERM: queue the stopped trial's parameters once more; the line that says so."""
    if not running:
        return f"no trial of study {cfg.study_name!r} had started in this worker"
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == running[-1])
    retried = ""
    if cfg.retry_dead_trials and trial.state == TrialState.FAIL and trial.params:
        before = len(study.get_trials(deepcopy=False))
        with warnings.catch_warnings():  # experimental in Optuna since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)  # once, as for a dead worker
        if len(study.get_trials(deepcopy=False)) > before:
            retried = ", its parameters queued to be tried again"
    return (
        f"trial {trial.number} of study {cfg.study_name!r} is marked {trial.state.name}{retried}, its MLflow runs "
        "KILLED; start a worker again to continue the study"
    )


def _log_study_summary(study: optuna.Study, cfg: SweepConfig) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if completed:
            if cfg.multi_objective:
                front = [
                    {
                        "number": t.number,
                        "values": t.values,
                        "params": t.params,
                        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                    }
                    for t in study.best_trials
                ]
                (out / "pareto_front.json").write_text(json.dumps(front, indent=2))
                mlflow.log_metric("pareto_front_size", len(front))
            else:
                best = study.best_trial
                mlflow.log_metric(f"best_{TARGETS[cfg.target].metric}", best.value)
                log_params_flat({f"best_{k}": v for k, v in best.params.items()})
                best_run = best.user_attrs.get("mlflow_run_id", "")
                mlflow.set_tag("best_mlflow_run_id", best_run)
                if best_run:  # the best trial's model, to load, register or serve (experiments.models.load_model)
                    mlflow.set_tag("best_model_uri", f"runs:/{best_run}/model")
            _log_study_figures(study, cfg, out)
        else:
            log.warning("no trial of study %s has completed yet", cfg.study_name)
        mlflow.log_artifacts(str(out))


ENTRY = EntryPoint(SweepConfig, PRESETS, run, __doc__)
config_from_preset, main = ENTRY.config_from_preset, ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
