"""Plumbing shared by the entry points: typed options from a config dataclass, starting or resuming a run.

Every field of the config becomes ``--field-name``; an option left unset (or passed as an empty
string, as ``mlflow run`` does for an unset parameter) takes the preset's value.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from experiments.tracking import (
    configure_tracking,
    log_config,
    log_json,
    log_metrics,
    log_params_flat,
    run_status,
    tracked_run,
)
from pipeline.data import DatasetNotFoundError
from pipeline.logging_setup import setup_logging
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.device import apply_thread_budget, use_deterministic_algorithms
from pipeline.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    broadcast_object,
    replica_deviation,
)
from pipeline.training.loop import EpochHook, LoopState, restore
from pipeline.training.numerics import flush_denormals
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import (
    ExactLogDet,
    LogDetEstimator,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
)

C = TypeVar("C")

RESUME_OVERRIDABLE = ("epochs", "device", "progress", "checkpoint_dir")


@dataclass(frozen=True)
class EstimatorOptions:
    """The log-det estimator of a run, as flat options (inherited by the density and toy configs).

    ``estimator``: ``power_series`` (the paper: ``n_terms``, biased by the truncation),
    ``russian_roulette`` (unbiased: ``n_exact_terms`` plus a ``roulette``-distributed number more) or
    ``exact`` (brute force, low dimensions). ``gradient``: ``neumann`` (the default: memory-saving and
    faster, the same expected gradient) or ``backprop`` through the series (the paper's formulation).
    ``n_probes`` Hutchinson probes of kind ``probe``.
    """

    estimator: str = "power_series"
    n_terms: int = 5
    n_exact_terms: int = 2
    roulette: str = "geometric"
    roulette_p: float = 0.5
    roulette_rate: float = 2.0
    gradient: str = "neumann"  # same expected gradient as backprop, faster and without a graph per term
    n_probes: int = 1
    probe: str = "gaussian"

    def __post_init__(self) -> None:
        self.training_estimator()  # validates every option (the library raises with a clear message)
        _next_post_init(self, EstimatorOptions)

    def training_estimator(self) -> LogDetEstimator:
        series = dict(n_probes=self.n_probes, probe=self.probe, gradient=self.gradient)
        if self.estimator == "power_series":
            return PowerSeriesLogDet(n_terms=self.n_terms, **series)
        if self.estimator == "russian_roulette":
            return RussianRouletteLogDet(
                n_exact_terms=self.n_exact_terms,
                distribution=self.roulette,
                p=self.roulette_p,
                rate=self.roulette_rate,
                **series,
            )
        if self.estimator == "exact":
            return ExactLogDet()
        raise ValueError(
            f"unknown log-det estimator {self.estimator!r}; choose power_series, russian_roulette or exact"
        )


@dataclass(frozen=True)
class InverseOptions:
    """How a run inverts its blocks (reconstructions, samples), inherited by the density and classify configs."""

    inverse_tol: float = 1e-6  # atol = rtol on the per-sample residual
    inverse_method: str = "plain"  # or "anderson" (same tolerance, fewer evaluations of g)

    def __post_init__(self) -> None:
        if not self.inverse_tol > 0:
            raise ValueError(f"inverse_tol must be > 0, got {self.inverse_tol}")
        self.inverse_config()  # validates the method
        _next_post_init(self, InverseOptions)

    def inverse_config(self) -> FixedPointConfig:
        return FixedPointConfig(
            atol=self.inverse_tol, rtol=self.inverse_tol, max_iterations=200, method=self.inverse_method
        )


def _next_post_init(obj: Any, after: type) -> None:
    """Cooperative ``__post_init__``: a config inheriting several option sets validates each of them."""
    following = getattr(super(after, obj), "__post_init__", None)
    if following is not None:
        following()


def chain_epoch_hooks(*hooks: EpochHook | None) -> EpochHook:
    """One ``on_epoch_end`` that calls each hook given (``None`` skipped), in order."""

    def call(epoch: int, metrics: dict[str, float]) -> None:
        for hook in hooks:
            if hook is not None:
                hook(epoch, metrics)

    return call


OVERSHOOT_LAYERS_PER_EPOCH = 8  # layers whose training-forward norm is measured each epoch (rotating)


def log_spectral_estimates(model: Any, epoch: int, prefix: str = "") -> None:
    """Log every spectrally normalised layer's power-iteration estimate (and the steps it took) at ``epoch``,
    and the largest training-forward norm / c on a rotating sample of layers (the soft mode's overshoot)."""

    from pipeline.diagnostics import spectral_estimates, training_norm_ratios

    rows = spectral_estimates(model)
    if not rows:  # a vanilla network
        return
    sample = training_norm_ratios(
        model, max_layers=OVERSHOOT_LAYERS_PER_EPOCH, offset=epoch * OVERSHOOT_LAYERS_PER_EPOCH
    )
    metrics = {f"sigma/b{r['block']:03d}_l{r['layer']}": r["sigma"] for r in rows}
    steps = [r["power_iterations"] for r in rows]
    metrics |= {
        "sigma_max": max(r["sigma"] for r in rows),
        "power_iterations_mean": sum(steps) / len(steps),
        "power_iterations_max": max(steps),
        "lipschitz_training_ratio_max": max(r["ratio"] for r in sample),
    }
    log_metrics({prefix + k: v for k, v in metrics.items()}, epoch)


def _optional(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text == "":  # an unset MLflow parameter; "none" is a real value (e.g. --pruner none)
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if kind is tuple:
            return tuple(int(t) for t in text.replace(",", " ").split())
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def build_parser(config_cls: type, presets: dict[str, dict], description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=sorted(presets))
    for f in fields(config_cls):
        if f.name == "preset":
            continue
        type_name = str(f.type)
        kind = (
            tuple
            if "tuple" in type_name
            else {"int": int, "float": float, "bool": bool}.get(type_name.split(" ")[0], str)
        )
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_optional(kind), default=None)
    return parser


def config_from_preset(config_cls: type[C], presets: dict[str, dict], preset: str, **overrides: Any) -> C:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return config_cls(**{**presets[preset], **overrides, "preset": preset})


def config_for_resume(config_cls: type[C], run_id: str, **overrides: Any) -> C:
    """The configuration a run was started with, read from its checkpoint.

    Only ``epochs`` (to extend a run), ``device``, ``progress`` and ``checkpoint_dir`` may change;
    anything else would no longer be the same run.
    """
    unknown = set(overrides) - set(RESUME_OVERRIDABLE)
    if unknown:
        raise ValueError(f"a resumed run keeps its configuration; cannot change {sorted(unknown)} on resume")
    checkpoint_dir = overrides.get("checkpoint_dir", config_cls.checkpoint_dir)  # type: ignore[attr-defined]
    path = Path(checkpoint_dir) / run_id / "last.pt"
    if not path.exists():
        raise ValueError(f"cannot resume run {run_id}: no checkpoint at {path}")
    checkpoint = load_checkpoint(path)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["config"].items()}
    epochs = overrides.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise ValueError(f"cannot shorten a run on resume ({saved['epochs']} epochs were configured)")
    if checkpoint["epoch"] >= epochs and run_status(run_id) == "FINISHED":
        raise ValueError(
            f"run {run_id} already FINISHED all {checkpoint['epoch']} epochs; resuming it would log its final "
            f"metrics and model again. Pass --epochs N with N > {checkpoint['epoch']} to train it further"
        )
    return replace(config_cls(**saved), resume=run_id, **overrides)


@contextmanager
def main_rank_run(cfg: Any, ctx: DistributedContext) -> Iterator[str]:
    """The run's MLflow run: rank 0 opens (or resumes) it; every rank gets its id."""
    if ctx.is_main:
        with tracked_run(cfg.experiment_name, run_name=cfg.run_name, resume_run_id=cfg.resume) as active:
            if not cfg.resume:
                entry_point_logger(type(cfg)).info(
                    "run %s started (continue it after an interruption with --resume %s)",
                    active.info.run_id,
                    active.info.run_id,
                )
            yield broadcast_object(active.info.run_id, ctx)
    else:
        yield broadcast_object(None, ctx)


def start_or_resume(
    cfg: Any,
    run_id: str,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    device: Any,
    *,
    initialize: Callable[[], None],
    params: dict[str, Any],
    ctx: DistributedContext = SINGLE_PROCESS,
) -> tuple[LoopState | None, Path]:
    """Inside the active run: restore the checkpoint of a resumed run, or initialise and log a new one.

    ``initialize`` runs under ``no_grad`` on a new run (ActNorm's data-dependent init; on every rank,
    before the model is wrapped, so DDP then broadcasts rank 0's result); ``params`` are derived
    values logged beside the resolved configuration (rank 0). Under torchrun each rank then reseeds,
    so ranks draw different noise. Returns the loop state (``None`` for a new run) and the checkpoint path.
    """
    import mlflow
    import torch

    ckpt_path = Path(cfg.checkpoint_dir) / run_id / "last.pt"
    if ctx.is_main:
        mlflow.set_tag("checkpoint", str(ckpt_path))
    if cfg.resume:
        state, ckpt = restore(ckpt_path, model, optimizer, scheduler, device, ctx)
        if ctx.is_main:
            state.logged_step, state.logged_epoch = _last_logged(run_id)
            entry_point_logger(type(cfg)).info("resumed run %s at epoch %d (step %d)", run_id, state.epoch, state.step)
            if ckpt.get("config", {}).get("epochs") != cfg.epochs:
                mlflow.set_tag("epochs_extended_to", cfg.epochs)
        return state, ckpt_path
    with torch.no_grad():
        initialize()
    if ctx.enabled:
        torch.manual_seed(cfg.seed * 100_003 + 1 + ctx.rank)
    if ctx.is_main:
        log_config(cfg)
        log_params_flat({**params, **({"distributed_world_size": ctx.world_size} if ctx.enabled else {})})
        log_json(asdict(cfg), "config.json")
    return None, ckpt_path


def _last_logged(run_id: str) -> tuple[int, int]:
    """The last step of ``train_loss`` and the last epoch of ``epoch_seconds`` a run logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    epochs = [m.step for m in client.get_metric_history(run_id, "epoch_seconds")]
    return max(steps, default=0), max(epochs, default=0)


def log_replica_consistency(model: Any, ctx: DistributedContext, tolerance: float = 1e-4) -> None:
    """Under torchrun: check that every rank holds the same parameters and buffers (spectral state included)."""
    if not ctx.enabled:
        return

    deviation = replica_deviation(model, ctx)
    if ctx.is_main:
        log_metrics({"ddp_replica_max_deviation": deviation, "ddp_world_size": ctx.world_size})
        if deviation > tolerance:
            logging.getLogger(type(model).__module__).warning(
                "replicas differ by up to %.3e across %d ranks", deviation, ctx.world_size
            )


def entry_point_logger(config_cls: type) -> logging.Logger:
    """The entry point's logger, named after its module even when it runs as ``__main__`` (``python -m``),
    so that its records (the run id, "resumed at epoch N") pass :func:`setup_logging`'s project loggers."""
    module = config_cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else "experiments"
    return logging.getLogger(module)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that a user's input or environment causes, reported as one line (exit 2), not a traceback.

    Bad values (``ValueError``, ``TypeError``), missing data, paths that cannot be written or read, a
    diverged training (``FloatingPointError``) and a tracking store that refuses the request.
    """
    from mlflow.exceptions import MlflowException

    return (ValueError, TypeError, DatasetNotFoundError, OSError, FloatingPointError, MlflowException)


def _tag_launched_run(reason: str) -> None:
    """Under ``mlflow run``, a failure before the entry point claimed its launched run still says why there."""
    launched = os.environ.get("MLFLOW_RUN_ID")
    if not launched:
        return
    try:
        from mlflow.tracking import MlflowClient

        configure_tracking()
        MlflowClient().set_tag(launched, "failure", reason[:5000])
    except Exception:
        pass


def entry_point_main(
    config_cls: type[C],
    presets: dict[str, dict],
    run: Callable[[C], str],
    argv: list[str] | None,
    description: str | None,
) -> int:
    """Parse, validate, run; returns the process exit code (0, or 2 with one line on a user error).

    A user error (:func:`user_errors`) is logged as one line naming the cause (the traceback only at
    DEBUG level); a run it interrupts is already FAILED with the reason as its ``failure`` tag.
    Subnormal floats are flushed to zero in every CPU thread before the run (:mod:`pipeline.training.numerics`):
    values below ~1e-38 become zero instead of slowing every operation on them 10-100x.
    """
    setup_logging()
    log = entry_point_logger(config_cls)
    try:
        args = vars(build_parser(config_cls, presets, description).parse_args(argv))
        preset = args.pop("preset")
        overrides = {k: v for k, v in args.items() if v is not None}
        resume = overrides.pop("resume", None)
        cfg = (
            config_for_resume(config_cls, resume, **overrides)
            if resume
            else config_from_preset(config_cls, presets, preset, **overrides)
        )
        threads = apply_thread_budget(getattr(cfg, "threads", 0))
        use_deterministic_algorithms(getattr(cfg, "deterministic", False))
        flush_denormals()  # after the thread budget, so every intra-op worker it starts flushes too
        log.debug("%d CPU threads", threads)
    except user_errors() as exc:
        log.error("invalid configuration: %s", _one_line(exc))
        log.debug("details", exc_info=True)
        _tag_launched_run(f"invalid configuration: {_one_line(exc)}")
        return 2
    try:
        run_id = run(cfg)
    except user_errors() as exc:
        log.error("%s: %s", type(exc).__name__, _one_line(exc))
        log.debug("details", exc_info=True)
        _tag_launched_run(f"{type(exc).__name__}: {_one_line(exc)}")
        return 2
    log.info("finished run %s", run_id)
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + " ..."
