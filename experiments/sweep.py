"""``mlflow run . -e sweep``: an Optuna study over the Lipschitz coefficient, series terms and power iterations.

    python -m experiments.sweep --target density --n-trials 20
    python -m experiments.sweep --target classify --objective error-margin --n-trials 30
    python -m experiments.sweep --space-file space.yaml --target-overrides "epochs=3 eval_max_images=500"
    python -m experiments.sweep --storage journal:sweep.journal --study-name s1   # run in N terminals

Each trial trains the target on the training set minus a held-out validation split and is scored on
that split (never on the test set). One MLflow parent run per invocation; every trial is a nested
child run. Pruned trials end KILLED, trials that raise (or hit a NaN) end FAILED and the study goes on.

Several workers on one study (several processes, or machines sharing a database) share an exact
``--n-trials`` budget, and a trial whose worker died or was stopped is given back
(:mod:`experiments.study`). The trial and its MLflow child run are linked when the run starts (trial user
attributes ``mlflow_run_id`` / ``mlflow_parent_run_id``, run tags ``optuna_trial`` / ``optuna_study``). With
a database storage (the default SQLite file, or PostgreSQL, ...) each trial sends heartbeats
(``--heartbeat-interval``); a dead worker's trial is marked FAIL by the next worker and its MLflow child and
parent runs FAILED with a ``failure`` tag saying so. A journal file has no heartbeats: a killed worker's trial
stays RUNNING. A study in which no trial completed ends FAILED (exit 2). The search space is
:mod:`experiments.search_space`, the storage :mod:`experiments.study_storage`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import TrialState

from experiments.config import (
    log_configuration,
    option_text,
    run_tags,
)
from experiments.entry_point import EntryPoint
from experiments.metric_logging import log_metrics
from experiments.search_space import (
    check_study_compatible,
    suggest,
)
from experiments.study import (
    claim_slot,
    make_pruner,
    make_sampler,
    optimize_to_budget,
    recording_the_outcome,
    retry_once,
)
from experiments.study_storage import DeadTrialHandler, open_storage
from experiments.sweep_config import TARGETS, SweepConfig, read_metric
from experiments.tracking import (
    RunStopped,
    active_run_id,
    log_json,
    log_params_flat,
    on_run_start,
    set_description,
    tracked_run,
)

log = logging.getLogger("experiments.sweep")


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


def make_objective(
    cfg: SweepConfig, running: list[int] | None = None
) -> Callable[[optuna.Trial], float | tuple[float, float]]:
    """The study's objective; ``running`` (if given) collects the number of each trial as it starts."""
    running = [] if running is None else running
    target = TARGETS[cfg.target]
    space, base = cfg.space(), cfg.base_overrides()
    client = MlflowClient()

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        claim_slot(trial, cfg.n_trials)  # an excess claim is no outcome of the trial's: recorded as such alone
        running.append(trial.number)
        return recorded(trial)

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

        trial.set_user_attr("mlflow_parent_run_id", active_run_id())

        def link(run_id: str) -> None:  # at the child run's start: a worker dying mid-trial leaves both matched
            client.set_tag(run_id, "optuna_trial", trial.number)
            client.set_tag(run_id, "optuna_study", cfg.study_name)
            # the searched values, also where one equals the preset's (a run logs only the options set away from it)
            client.log_batch(run_id, params=[Param(k, option_text(v)) for k, v in params.items()])
            trial.set_user_attr("mlflow_run_id", run_id)

        with on_run_start(link):
            run_id = target.module.run(trial_cfg, on_epoch_end=report)
        metrics = client.get_run(run_id).data.metrics
        value = read_metric(metrics, target.metric)
        if not math.isfinite(value):
            raise FloatingPointError(f"{target.metric} is {value}")
        if cfg.multi_objective:
            return value, target.second[3](metrics)
        return value

    recorded = recording_the_outcome(run_trial)
    return objective


def objective_names(cfg: SweepConfig) -> list[str]:
    """The study's objectives, named as the trials' runs name the metrics (``val/bpd``, ``train/epoch_seconds``)."""
    target = TARGETS[cfg.target]
    return [target.metric] + ([target.second[1]] if cfg.multi_objective else [])


def _log_study_figures(study: optuna.Study, cfg: SweepConfig, out: Path) -> None:
    import optuna.visualization.matplotlib as ovm

    from pipeline.plotting import save_figure

    names = objective_names(cfg)
    plots: dict[str, Callable[[], Any]] = {}
    if cfg.multi_objective:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
        for i, name in enumerate(names):

            def history(i: int = i, name: str = name) -> Any:
                return ovm.plot_optimization_history(study, target=lambda t: t.values[i], target_name=name)

            plots[f"history_{name.replace('/', '_')}"] = history
    else:
        plots["history"] = lambda: ovm.plot_optimization_history(study, target_name=names[0])
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


def _dead_trial_handler(cfg: SweepConfig) -> DeadTrialHandler:
    """What the next worker does with a trial whose worker died: its MLflow runs FAILED, saying so, and (with
    ``retry_dead_trials``) its parameters queued once more."""

    def on_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = (
            f"sweep worker died: trial {trial.number} of study {cfg.study_name!r} sent no heartbeat for "
            f"{cfg.grace_period or 3 * cfg.heartbeat_interval} s"
        )
        log.warning("%s; marked FAIL%s", reason, ", retried once" if cfg.retry_dead_trials else "")
        client = MlflowClient()
        for key in ("mlflow_run_id", "mlflow_parent_run_id"):
            run_id = trial.user_attrs.get(key)
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="FAILED")
                client.set_tag(run_id, "failure", reason)
        if cfg.retry_dead_trials:
            retry_once(study, trial, dead_worker=True)

    return on_dead_trial


def run(cfg: SweepConfig) -> str:
    """Run this worker's share of the study under one MLflow parent run; returns its run id."""
    journal = cfg.storage.startswith("journal:")
    storage = open_storage(
        cfg.storage,
        heartbeat_interval=None if journal else cfg.heartbeat_interval,
        grace_period=cfg.grace_period,
        on_dead_trial=_dead_trial_handler(cfg),
    )
    if journal:
        log.warning("a journal storage has no heartbeats: a worker killed mid-trial leaves that trial RUNNING")
    second = [StudyDirection[TARGETS[cfg.target].second[2].upper()]] if cfg.multi_objective else []
    directions = [StudyDirection.MINIMIZE, *second]
    study = optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        load_if_exists=True,
        directions=directions,
        sampler=make_sampler(cfg.sampler, cfg.seed),
        pruner=make_pruner(cfg.pruner, multi_objective=cfg.multi_objective),
    )
    if study.directions != directions:
        raise ValueError(
            f"study {cfg.study_name!r} exists with directions {[d.name.lower() for d in study.directions]}, not "
            f"{directions} (objective {cfg.objective!r}); use the study's objective or another --study-name"
        )
    check_study_compatible(study, cfg.space())
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what became of each trial (log_trial)
    with warnings.catch_warnings():  # Optuna flags it experimental (since 3.2)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(objective_names(cfg))
    name = cfg.run_name or f"sweep-{cfg.study_name}"
    with tracked_run(cfg.experiment_name, run_name=name, tags=run_tags(cfg)) as parent:
        _describe_study(study, cfg, parent.info.run_id)
        log_configuration(cfg)
        log_json(cfg.space(), "search_space.json")
        mlflow.set_tag("optuna_study", cfg.study_name)
        set_description(
            parent.info.run_id,
            f"Optuna study {cfg.study_name!r}: {cfg.n_trials} trials of {cfg.target} "
            f"{cfg.target_preset}, minimising {objective_names(cfg)[0]} on a validation split",
        )
        _optimize(study, cfg, storage)
        summary = _log_study_summary(study, cfg)
        log.info("%s", summary)
        set_description(parent.info.run_id, summary)
        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            failure = next((t.user_attrs["failure"] for t in trials if t.user_attrs.get("failure")), "")
            raise ValueError(
                f"no trial of study {cfg.study_name!r} completed" + (f"; first failure: {failure}" if failure else "")
            )
    return parent.info.run_id


def _describe_study(study: optuna.Study, cfg: SweepConfig, parent_run_id: str) -> None:
    """What the study is, as its user attributes (optuna-dashboard shows them): the target with its preset and
    overrides, the dataset, the search space, the MLflow experiment and the parent run of each worker."""
    base = TARGETS[cfg.target].module.config_from_preset(cfg.target_preset, **cfg.base_overrides())
    attrs = {
        "target": cfg.target,
        "target_preset": cfg.target_preset,
        "target_overrides": " ".join(f"{k}={option_text(v)}" for k, v in cfg.base_overrides().items()),
        "dataset": getattr(base, "dataset", ""),
        "objective": cfg.objective,
        "validation_fraction": cfg.validation_fraction,
        "search_space": json.dumps(cfg.space()),
        "mlflow_experiment": cfg.experiment_name,
        "mlflow_tracking_uri": mlflow.get_tracking_uri(),
        "mlflow_parent_run_id": parent_run_id,  # the latest worker's; every worker's below
        "mlflow_parent_run_ids": [*study.user_attrs.get("mlflow_parent_run_ids", []), parent_run_id],
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def params_text(params: dict[str, Any]) -> str:
    """``coeff=0.7517 n_exact_terms=6``: a trial's parameters as a console line shows them (floats to 4 digits)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={option_text(v)}" for k, v in params.items())


def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The console line of a trial that ended in this worker: its value, pruning or failure, and the best so far."""
    if trial.user_attrs.get("excess_claim"):
        return
    names = study.metric_names or ["value"]
    params = params_text(trial.params)
    if trial.state == TrialState.COMPLETE and trial.values is not None:
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, trial.values, strict=False))
        best = ""
        if len(study.directions) == 1:
            best = f"; best is trial {study.best_trial.number} ({names[0]}={study.best_value:.4g})"
        log.info("trial %d finished: %s with %s%s", trial.number, values, params, best)
    elif trial.state == TrialState.PRUNED:
        step = trial.last_step
        seen = f" ({names[0]}={trial.intermediate_values[step]:.4g})" if step is not None else ""
        log.info("trial %d pruned after epoch %s%s with %s", trial.number, step, seen, params)
    elif trial.state == TrialState.FAIL:
        log.warning("trial %d failed: %s", trial.number, trial.user_attrs.get("failure", "the worker stopped"))


def _optimize(study: optuna.Study, cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> None:
    """This worker's share of the study; after Ctrl-C or SIGTERM, the line that says what became of its trial."""
    running: list[int] = []
    try:
        optimize_to_budget(
            study,
            make_objective(cfg, running),
            n_trials=cfg.n_trials,
            storage=storage,
            timeout=cfg.timeout,
            poll_s=cfg.heartbeat_interval,
            callbacks=[log_trial],
            worker_trials=cfg.worker_trials,
        )
    except KeyboardInterrupt as exc:
        exc.stop_hint = _stopped_trial(study, cfg, running)  # type: ignore[attr-defined]
        raise


def _stopped_trial(study: optuna.Study, cfg: SweepConfig, running: list[int]) -> str:
    """After Ctrl-C or SIGTERM: queue the stopped trial's parameters once more; the line that says so."""
    if not running:
        return f"no trial of study {cfg.study_name!r} had started in this worker"
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == running[-1])
    retried = ""
    stopped_with_params = trial.state == TrialState.FAIL and bool(trial.params)
    if cfg.retry_dead_trials and stopped_with_params and retry_once(study, trial, dead_worker=False):
        retried = ", its parameters queued to be tried again"
    return (
        f"trial {trial.number} of study {cfg.study_name!r} is marked {trial.state.name}{retried}, its MLflow runs "
        "KILLED; start a worker again to continue the study"
    )


def _log_study_summary(study: optuna.Study, cfg: SweepConfig) -> str:
    """The study's counts, best trial and figures on the parent run; returns the summary line (its description)."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("excess_claim")]
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    log_metrics({f"trials/{k}": v for k, v in counts.items()}, len(trials))
    names = objective_names(cfg)
    tally = ", ".join(f"{counts[k]} {k}" for k in ("complete", "pruned", "fail") if counts[k] or k == "complete")
    summary = f"study {cfg.study_name!r}: {len(trials)} trials ({tally})"
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
                log_metrics({"best/pareto_front_size": len(front)}, len(trials))
                summary += f"; Pareto front of {len(front)} trials over {' and '.join(names)} (pareto_front.json)"
            else:
                best = study.best_trial
                assert best.value is not None  # the best trial is a completed one
                log_metrics({f"best/{names[0]}": best.value, "best/trial": best.number}, len(trials))
                log_params_flat({f"best_{k}": v for k, v in best.params.items()})
                best_run = best.user_attrs.get("mlflow_run_id", "")
                mlflow.set_tag("best_mlflow_run_id", best_run)
                if best_run:  # the best trial's model, to load, register or serve (experiments.models.load_model)
                    mlflow.set_tag("best_model_uri", f"runs:/{best_run}/model")
                params = params_text(best.params)
                summary += f"; best trial {best.number}: {names[0]}={best.value:.4g} with {params}"
                summary += f" (run {best_run})" if best_run else ""
            _log_study_figures(study, cfg, out)
        else:
            log.warning("no trial of study %s has completed yet", cfg.study_name)
        mlflow.log_artifacts(str(out))
    return summary


ENTRY = EntryPoint(SweepConfig, PRESETS, run, __doc__)
config_from_preset, main = ENTRY.config_from_preset, ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
