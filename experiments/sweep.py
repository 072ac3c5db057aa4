"""``mlflow run . -e sweep``: an Optuna study over the Lipschitz coefficient, series terms and power iterations.

    python -m experiments.sweep --target density --n-trials 20
    python -m experiments.sweep --target classify --objective error-margin --n-trials 30
    python -m experiments.sweep --space-file space.yaml --target-overrides "epochs=3 eval_max_images=500"
    python -m experiments.sweep --storage journal:sweep.journal --study-name s1   # run in N terminals

Each trial trains the target on the training set minus a held-out validation split and is scored on
that split (never on the test set). One MLflow parent run per invocation; every trial is a nested
child run. Pruned trials end KILLED, trials that raise (or hit a NaN) end FAILED and the study goes on.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
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

from experiments import classify, cli, density
from pipeline.tracking import PROJECT_ROOT, RunStopped, log_config, log_json, log_params_flat, tracked_run

log = logging.getLogger("experiments.sweep")

DEFAULT_SPACE: dict[str, dict] = {
    "coeff": {"type": "float", "low": 0.5, "high": 0.97},
    "n_terms": {"type": "int", "low": 1, "high": 10},  # density only (the classifier has no log-det)
    "n_power_iterations": {"type": "int", "low": 1, "high": 10},
}
LR_SPACE = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


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
    target_overrides: str = "epochs=2 eval_max_images=500"  # "field=value ..." applied to every trial
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
    experiment_name: str = "sweep"
    run_name: str | None = None
    checkpoint_dir: str = str(PROJECT_ROOT / "checkpoints")
    progress: bool = False

    def __post_init__(self) -> None:
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
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in (0, 1): the objective is a held-out score, "
                f"got {self.validation_fraction}"
            )
        self.space()  # validates the space file
        # the overrides must make a valid target configuration: refused now, not in every trial
        target.module.config_from_preset(self.target_preset, **self.base_overrides())

    @property
    def multi_objective(self) -> bool:
        return self.objective != "single"

    def space(self) -> dict[str, dict]:
        if self.space_file:
            path = Path(self.space_file)
            if not path.exists():
                raise ValueError(f"space file {path} does not exist")
            text = path.read_text()
            space = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
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
            if spec["type"] == "categorical" and not spec.get("choices"):
                raise ValueError(f"categorical {name!r} needs choices")
            if spec["type"] != "categorical" and not spec["low"] < spec["high"]:
                raise ValueError(f"{name!r}: need low < high, got {spec}")
        return space

    def base_overrides(self) -> dict[str, Any]:
        """``target_overrides`` parsed with the target's own option types."""
        argv = []
        for item in self.target_overrides.split():
            if "=" not in item:
                raise ValueError(f"target_overrides entries look like field=value, got {item!r}")
            key, value = item.split("=", 1)
            argv += [f"--{key.replace('_', '-')}", value]
        target = TARGETS[self.target]
        parser = cli.build_parser(target.config_cls, target.module.PRESETS, None)
        try:
            parsed = vars(parser.parse_args(argv))
        except SystemExit:
            raise ValueError(f"bad target_overrides {self.target_overrides!r}") from None
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
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params


def make_storage(spec: str) -> str | optuna.storages.BaseStorage:
    if not spec:
        return f"sqlite:///{PROJECT_ROOT / 'optuna.db'}"
    if spec.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
    return spec


def _sampler(cfg: SweepConfig) -> optuna.samplers.BaseSampler:
    return (
        optuna.samplers.RandomSampler(seed=cfg.seed)
        if cfg.sampler == "random"
        else optuna.samplers.TPESampler(seed=cfg.seed)
    )


def _pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    if cfg.multi_objective or cfg.pruner == "none":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def make_objective(cfg: SweepConfig) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    target = TARGETS[cfg.target]
    space, base = cfg.space(), cfg.base_overrides()
    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
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
        try:
            run_id = target.module.run(trial_cfg, on_epoch_end=report)
        finally:  # tag the child run whether it finished, failed or was pruned
            children = client.search_runs(
                [parent.info.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                f"and tags.mlflow.runName = 'trial-{trial.number}'",
            )
            for child in children:
                client.set_tag(child.info.run_id, "optuna_trial", trial.number)
                client.set_tag(child.info.run_id, "optuna_study", cfg.study_name)
                trial.set_user_attr("mlflow_run_id", child.info.run_id)
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
        except Exception as exc:  # noqa: BLE001 - e.g. too few finished trials for importances
            log.warning("skipped the %s figure: %s", name, exc)
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        save_figure(fig, out / f"{name}.png")


def run(cfg: SweepConfig) -> str:
    """Run this worker's share of the study under one MLflow parent run; returns its run id."""
    storage = make_storage(cfg.storage)
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
        raise ValueError(f"study {cfg.study_name!r} exists with other directions; use another --study-name")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    with tracked_run(cfg.experiment_name, run_name=cfg.run_name or f"sweep-{cfg.study_name}") as parent:
        log_config(cfg)
        log_json(cfg.space(), "search_space.json")
        mlflow.set_tag("optuna_study", cfg.study_name)
        remaining = cfg.n_trials - len(study.get_trials(deepcopy=False, states=finished))
        if remaining > 0:
            study.optimize(
                make_objective(cfg),
                n_trials=remaining,
                timeout=cfg.timeout or None,
                catch=(Exception,),  # a failing trial is recorded FAILED; the study goes on
                callbacks=[optuna.study.MaxTrialsCallback(cfg.n_trials, states=finished)],
            )
        _log_study_summary(study, cfg)
    return parent.info.run_id


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
                mlflow.set_tag("best_mlflow_run_id", best.user_attrs.get("mlflow_run_id", ""))
            _log_study_figures(study, cfg, out)
        else:
            log.warning("no trial of study %s has completed yet", cfg.study_name)
        mlflow.log_artifacts(str(out))


def config_from_preset(preset: str, **overrides) -> SweepConfig:  # noqa: ANN003
    return cli.config_from_preset(SweepConfig, PRESETS, preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    return cli.entry_point_main(SweepConfig, PRESETS, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
