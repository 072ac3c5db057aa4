"""One Optuna study shared by several workers (processes, or machines sharing a database): an exact trial
budget, a sampler per trial, and trials whose worker died or was stopped given back.

* ``n_trials`` is exact across workers: a trial claims a slot when it starts (:func:`claim_slot`); a claim
  beyond the budget (two workers starting the last slot at once) never trains and is recorded FAIL with the user
  attribute ``excess_claim``. Optuna's ``MaxTrialsCallback`` stops a worker only after its trial ends, so
  parallel workers overshoot it; it cannot give this.
* A trial whose worker died (no heartbeat for the grace period; database storages) is failed by the next
  worker, its slot freed and, optionally, its parameters tried once more (Optuna's
  ``RetryHeartbeatStaleTrialCallback``); a trial stopped by Ctrl-C or SIGTERM is queued again the same way
  (``RetryFailedTrialCallback``).
* A worker whose budget is spent waits while other workers' trials still run, so that a slot freed by a dead
  worker is filled: the study ends with ``n_trials`` trials done.
* Each trial's sampler is seeded from ``(seed, trial number)`` (:class:`TrialSeededSampler`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from experiments.study_storage import has_heartbeats

log = logging.getLogger("experiments.sweep")

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")


class ExcessClaim(RuntimeError):
    """A trial started after the study's budget was already claimed by other workers; it does not train."""


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Running or done trials, and failures raised by the objective; not excess claims, not dead workers."""
    if trial.user_attrs.get("excess_claim"):
        return False
    if trial.state == TrialState.FAIL:
        return bool(trial.user_attrs.get("worker_done"))  # else its worker died: the slot is free again
    return trial.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def claim_slot(trial: optuna.Trial, n_trials: int) -> None:
    """Refuse (:class:`ExcessClaim`) a trial that started after ``n_trials`` others already claimed the budget."""
    counted = sorted(t.number for t in trial.study.get_trials(deepcopy=False) if counts_toward_budget(t))
    if trial.number in counted and counted.index(trial.number) >= n_trials:
        trial.set_user_attr("excess_claim", True)
        raise ExcessClaim(f"the study's {n_trials} trials were already claimed by other workers")


def recording_the_outcome(run_trial: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """``run_trial`` marked ``worker_done`` when it returns or raises (its failure recorded), so that a trial
    FAILED by the objective keeps its slot and one FAILED by a dead or stopped worker frees it."""

    def objective(trial: optuna.Trial) -> Any:
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

    return objective


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

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0])
            self._current = (trial.number, self._make(seed))
        return self._current[1]

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, optuna.distributions.BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """``tpe`` or ``random``, one per trial (:class:`TrialSeededSampler`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    make = optuna.samplers.RandomSampler if name == "random" else optuna.samplers.TPESampler
    return TrialSeededSampler(lambda trial_seed: make(seed=trial_seed), seed)


def make_pruner(name: str, *, multi_objective: bool) -> optuna.pruners.BasePruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; choose one of {PRUNERS}")
    if multi_objective or name == "none":  # Optuna prunes single-objective studies only
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def retry_once(study: optuna.Study, trial: FrozenTrial, *, dead_worker: bool) -> bool:
    """Queue the parameters of a trial that a dead (``dead_worker``) or stopped worker left FAIL, once; whether a
    new trial was queued (a retry of a retry is not)."""
    before = len(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():  # both callbacks are flagged experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = (
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            if dead_worker
            else optuna.storages.RetryFailedTrialCallback(max_retry=1)
        )
        callback(study, trial)
    return len(study.get_trials(deepcopy=False)) > before


def optimize_to_budget(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    *,
    n_trials: int,
    storage: optuna.storages.BaseStorage,
    timeout: float = 0.0,
    poll_s: float = 10.0,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    worker_trials: int = 0,
) -> None:
    """Claim and run trials until the study holds ``n_trials`` counted ones (exact across workers), ``timeout`` s
    (0: none) pass for this worker, or this worker has run ``worker_trials`` (0: no limit; one per job of a batch
    array, say). A trial that raises is recorded FAIL and the study goes on."""
    deadline = time.monotonic() + timeout if timeout else math.inf
    heartbeats = has_heartbeats(storage)
    started = 0
    while time.monotonic() < deadline and not (worker_trials and started >= worker_trials):
        if heartbeats:
            with warnings.catch_warnings():  # Optuna flags it experimental (since 2.9)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        counted = [t for t in trials if counts_toward_budget(t)]
        if len(counted) < n_trials or any(t.state == TrialState.WAITING for t in trials):
            started += 1
            study.optimize(
                objective,
                n_trials=1,
                timeout=None if math.isinf(deadline) else max(deadline - time.monotonic(), 0.0),
                catch=(Exception,),
                callbacks=callbacks,
            )
        elif heartbeats and any(t.state == TrialState.RUNNING for t in counted):
            time.sleep(poll_s)  # another worker's trial runs; if that worker dies, its slot frees
        else:
            return


class _NoTracebackForStops(logging.Filter):
    """Optuna logs a trial cut by Ctrl-C or SIGTERM as failed, with a traceback; a stop is no error: the line stays,
    the traceback goes (the entry point says what was stopped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            record.exc_info = None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoTracebackForStops())
