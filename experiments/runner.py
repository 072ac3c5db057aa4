"""The life of a training run (the process around it: :mod:`experiments.entry_point`).

:func:`run_training` is the training run of every image entry point (density, classify): data
and splits, the tracked MLflow run started or resumed from its checkpoint, data-parallel wrapping, the
epoch loop, the replica check; what differs is a small :class:`TrainingTask` (build, step, evaluate,
finalise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import mlflow
import torch
from torch import Tensor, nn

from experiments import config as configuration
from experiments.entry_point import entry_point_logger
from experiments.epoch_hooks import chain_epoch_hooks, log_replica_consistency, log_spectral_estimates
from experiments.metric_logging import (
    MetricBuffer,
    buffered_metrics,
    log_metrics,
    logging_only_missing,
    write_unwritten,
)
from experiments.tracking import log_params_flat, run_page, set_description, tracked_run
from experiments.tracking_store import TrackingStoreUnreachable, retry_tracking_write
from pipeline.data import ImageDataset, ImageSplit, epoch_batches, load_dataset
from pipeline.training.checkpoint import checkpoint_lease, load_checkpoint
from pipeline.training.device import deterministic_algorithms
from pipeline.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    broadcast_object,
    check_global_batch,
    distributed_session,
    shard_batches,
    wrap_model,
)
from pipeline.training.loop import EpochHook, LoopConfig, LoopState, check_checkpoint_fits, fit, restore

C = TypeVar("C")

MODEL_RESULTS = "test/"  # the last epoch's metrics with this prefix are the trained model's: logged with the model


# --- the training run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Splits:
    """The data of a training run: the dataset, the part trained on, and the held-out part (``None``: none)."""

    data: ImageDataset
    train: ImageSplit
    validation: ImageSplit | None


class TrainingTask(Protocol):
    """What an entry point adds to :func:`run_training`: the model and its optimisation, one step, evaluation."""

    # read-only members: a task's own attributes may be narrower (an IResNetFlow, an Adamax, a LambdaLR)
    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler: ...

    @property
    def eval_every(self) -> int:
        """Epochs between evaluations (0: the last only)."""
        ...

    @property
    def loss_name(self) -> str:
        """The training loss's metric name, with its unit (``bpd``, ``cross_entropy_nats``): ``train/<loss_name>``."""
        ...

    def initialize(self) -> None:
        """A new run's data-dependent initialisation (ActNorm), under ``no_grad``, on every rank."""

    def params(self) -> dict[str, Any]:
        """Derived values logged beside the configuration (a new run)."""

    def on_start(self, new_run: bool) -> None:
        """Inside the tracked run, before training (rank 0)."""

    def step(self, forward: nn.Module, batch: Any) -> tuple[Tensor, Mapping[str, Tensor]]:
        """The loss of one batch and metrics to log; ``forward`` is the model as trained (DDP-wrapped)."""

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Metrics after ``epoch``, on every rank (each scores its share of the images; every rank returns all)."""

    def finalise(self, run_id: str, state: LoopState) -> str:
        """After the last epoch (rank 0): figures, artifacts, and the model with its results
        (``state.model_results``: the last epoch's test metrics, :data:`MODEL_RESULTS`), metrics at ``state.step``,
        the last one; returns the run's headline (markdown, its description). A resume whose checkpoint holds the
        last epoch calls it again: what the interrupted call logged is then not logged twice
        (:func:`~experiments.metric_logging.logging_only_missing`)."""


def run_training(
    cfg: Any,
    make_task: Callable[[Any, Splits, torch.device, DistributedContext], TrainingTask],
    on_epoch_end: EpochHook | None,
) -> str:
    """Train ``make_task(cfg, splits, device, ctx)`` under ``cfg``; returns the MLflow run id.

    ``cfg`` has the fields every training config has (data, batch, epochs, device, bookkeeping).
    Under ``torchrun`` the ranks train data-parallel (see :mod:`pipeline.training.distributed`).
    """
    started = time.perf_counter()
    with deterministic_algorithms(cfg.deterministic), distributed_session(cfg.device) as (ctx, device):
        check_global_batch(cfg.batch_size, ctx)
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download)  # fails before a run exists
        train, validation = (
            data.split_validation(cfg.validation_fraction, seed=cfg.seed)
            if cfg.validation_fraction > 0
            else (data.train, None)
        )
        # on a GPU the training images live there (uint8, once): a batch is then an index into device memory, not a
        # copy from pageable host memory per step, which non_blocking cannot overlap with compute
        on_device = train.to(device) if device.type == "cuda" else train
        batches = shard_batches(epoch_batches(on_device, cfg.batch_size, cfg.seed), ctx)  # refuses a batch > data
        torch.manual_seed(cfg.seed)
        splits = Splits(data, train, validation)
        task = make_task(cfg, splits, device, ctx)
        resumed_from = None
        if cfg.resume:  # a checkpoint that cannot continue this run is refused before the run is touched
            path = checkpoint_directory(cfg, cfg.resume) / "last.pt"
            resumed_from = load_checkpoint(path)  # read once: restored from this after the run's lease is taken
            check_checkpoint_fits(resumed_from, path, task.model, task.optimizer)
        with main_rank_run(cfg, ctx) as run_id:
            resumed, checkpoint_path = start_or_resume(cfg, run_id, task, device, ctx, resumed_from)
            state = resumed or LoopState()  # fit updates it in place: the epoch hooks read its step
            if ctx.is_main:
                if resumed is None:
                    log_datasets(splits)
                task.on_start(resumed is None)
            train_tracked(cfg, task, batches, run_id, state, checkpoint_path, on_epoch_end, ctx=ctx, device=device)
            log_replica_consistency(task.model, ctx, state.step)
            if ctx.is_main:
                with logging_only_missing(run_id, state.step) if resumed is not None else nullcontext():
                    headline = task.finalise(run_id, state)
                set_description(run_id, f"{headline}; {duration(time.perf_counter() - started)} in this process.")
    return run_id


def train_tracked(
    cfg: Any,
    task: TrainingTask,
    batches: Callable[[int], Iterable[Any]],
    run_id: str,
    state: LoopState,
    checkpoint_path: Path,
    on_epoch_end: EpochHook | None,
    *,
    ctx: DistributedContext,
    device: torch.device,
) -> None:
    """The epoch loop of a started or resumed run, its metrics through a buffer (rank 0). The data-parallel
    wrapper lives in this frame only: it holds the process group, which is left after this returns, so the group's
    threads are joined then, not during the interpreter's exit (where gloo aborted the process)."""
    forward = wrap_model(task.model, ctx, device)  # DDP under torchrun (after the initialisation)
    loop = LoopConfig(
        log_metrics=log_metrics,
        epochs=cfg.epochs,
        checkpoint_path=checkpoint_path,
        grad_clip=cfg.grad_clip,
        log_every=cfg.log_every,
        eval_every=task.eval_every,
        loss_name=task.loss_name,
        model_results=lambda key: key.startswith(MODEL_RESULTS),
        amp=cfg.amp,
        progress=cfg.progress,
        distributed=ctx,
    )
    with buffered_metrics(run_id, unwritten_metrics_path(cfg, run_id)) if ctx.is_main else nullcontext() as buffer:
        fit(
            task.model,
            task.optimizer,
            task.scheduler,
            batches,
            compiled_step(task, forward, cfg.compile),
            loop,
            state=state,
            evaluate=task.evaluate,
            checkpoint_extra={
                "config": asdict(cfg),
                "entry_point": configuration.entry_point_module(type(cfg)),
                "architecture": configuration.resolved_architecture(cfg),  # immune to later preset changes
            },
            on_epoch_end=chain_epoch_hooks(
                lambda epoch, _: log_spectral_estimates(task.model, epoch, state.step),
                on_epoch_end,
                lambda epoch, _: stop_if_tracking_unreachable(buffer, cfg, run_id, epoch),
            ),
        )
        if buffer is not None and not buffer.close(timeout_s=cfg.tracking_outage_s):
            stop_if_tracking_unreachable(buffer, cfg, run_id, state.epoch, waited=True)


def compiled_step(task: TrainingTask, forward: nn.Module, compile_step: bool) -> Callable[[Any], Any]:
    """The training step ``batch -> (loss, metrics)``; with ``compile_step``, through ``torch.compile`` (the loss
    and its graph; the optimizer step and the loop's bookkeeping stay eager)."""

    def step(batch: Any) -> Any:
        return task.step(forward, batch)

    return torch.compile(step) if compile_step else step


UNWRITTEN_METRICS_FILE = "unwritten_metrics.jsonl"


def unwritten_metrics_path(cfg: Any, run_id: str) -> Path:
    """Where a run keeps the metrics the tracking store did not take (beside its checkpoint)."""
    return checkpoint_directory(cfg, run_id) / UNWRITTEN_METRICS_FILE


def stop_if_tracking_unreachable(
    buffer: MetricBuffer | None, cfg: Any, run_id: str, epoch: int, *, waited: bool = False
) -> None:
    """After epoch ``epoch``'s checkpoint: keep what the store has not taken beside it, and stop the run (one
    line: what, where, and how to continue) once the store has taken nothing for ``cfg.tracking_outage_s`` (or
    ``waited``: the end of the training waited that long for it)."""
    if buffer is None:
        return
    buffer.raise_error()
    n_unwritten = buffer.save_unwritten()
    if not waited and buffer.unwritten_seconds() <= cfg.tracking_outage_s:
        return
    raise TrackingStoreUnreachable(
        f"the tracking store {mlflow.get_tracking_uri()} has taken none of run {run_id}'s metrics for "
        f"{buffer.unwritten_seconds():.3g} s (tracking_outage_s={cfg.tracking_outage_s:g}): training stopped after "
        f"epoch {epoch}, its checkpoint {checkpoint_directory(cfg, run_id) / 'last.pt'} is intact and the "
        f"{n_unwritten} metric values not yet written are kept in {unwritten_metrics_path(cfg, run_id)}. Once the "
        f"store is back, continue with --resume {run_id} (they are written then)"
    )


def duration(seconds: float) -> str:
    """``4 min 7 s``, ``12 s``, ``2 h 3 min``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def checkpoint_directory(cfg: Any, run_id: str) -> Path:
    return Path(cfg.checkpoint_dir) / run_id


@contextmanager
def main_rank_run(cfg: Any, ctx: DistributedContext = SINGLE_PROCESS) -> Iterator[str]:
    """The run's MLflow run: rank 0 opens (or resumes) it, holding the lease of its checkpoint directory
    (:func:`~pipeline.training.checkpoint.checkpoint_lease`); every rank gets its id.

    A resume takes the lease before it touches the run: a run still training elsewhere is refused and left as it
    is. A run stopped by Ctrl-C or SIGTERM ends KILLED; the exception then carries the line that says how to
    continue it (``stop_hint``).
    """
    if not ctx.is_main:
        run_id = broadcast_object(None, ctx)
        try:
            yield run_id
        except KeyboardInterrupt as exc:
            exc.stop_hint = f"rank {ctx.rank} of run {run_id} stopped (rank 0 records the run)"  # type: ignore[attr-defined]
            raise
        return
    with ExitStack() as stack:
        if cfg.resume:
            stack.enter_context(checkpoint_lease(checkpoint_directory(cfg, cfg.resume)))
        active = stack.enter_context(
            tracked_run(
                cfg.experiment_name,
                run_name=cfg.run_name or configuration.default_run_name(cfg),
                resume_run_id=cfg.resume,
                log_system_metrics=cfg.log_system_metrics,
                tags=configuration.run_tags(cfg),
            )
        )
        run_id = active.info.run_id
        log = entry_point_logger(type(cfg))
        if not cfg.resume:
            stack.enter_context(checkpoint_lease(checkpoint_directory(cfg, run_id)))
            log.info("run %s started (continue it after an interruption with --resume %s)", run_id, run_id)
            set_description(run_id, f"Training ({configuration.default_run_name(cfg)}) ... continue it after an "
                            f"interruption with `--resume {run_id}`.")  # fmt: skip
        log.info("follow it in the MLflow UI: %s", run_page(mlflow.get_run(run_id)))
        try:
            yield broadcast_object(run_id, ctx)
        except KeyboardInterrupt as exc:
            exc.stop_hint = (  # type: ignore[attr-defined]
                f"run {run_id} is marked KILLED with its last checkpoint kept; continue it with --resume {run_id}"
            )
            raise


def start_or_resume(
    cfg: Any,
    run_id: str,
    task: TrainingTask,
    device: torch.device,
    ctx: DistributedContext = SINGLE_PROCESS,
    checkpoint: dict | None = None,
) -> tuple[LoopState | None, Path]:
    """Inside the active run: restore the checkpoint of a resumed run, or initialise and log a new one.

    A new run's ``task.initialize()`` runs under ``no_grad`` on every rank, before the model is wrapped, so
    DDP then broadcasts rank 0's result; ``task.params()`` are logged beside the resolved configuration
    (rank 0), with the options set away from the preset and ``config.json``. Under torchrun each rank then
    reseeds, so ranks draw different noise. Returns the loop state
    (``None`` for a new run) and the checkpoint path. ``checkpoint``: a resumed run's, already read.
    """
    checkpoint_path = checkpoint_directory(cfg, run_id) / "last.pt"
    if ctx.is_main:
        mlflow.set_tag("checkpoint", str(checkpoint_path))
    if cfg.resume:
        state, checkpoint = restore(
            checkpoint_path, task.model, task.optimizer, task.scheduler, ctx, checkpoint=checkpoint
        )
        if ctx.is_main:
            write_unwritten(run_id, unwritten_metrics_path(cfg, run_id))  # what the store did not take before
            state.logged_step, state.logged_epoch = _last_logged(run_id)
            entry_point_logger(type(cfg)).info("resumed run %s at epoch %d (step %d)", run_id, state.epoch, state.step)
            if checkpoint.get("config", {}).get("epochs") != cfg.epochs:
                mlflow.set_tag("epochs_extended_to", cfg.epochs)
        return state, checkpoint_path
    with torch.no_grad():
        task.initialize()
    if ctx.enabled:
        torch.manual_seed(cfg.seed * 100_003 + 1 + ctx.rank)
    if ctx.is_main:
        configuration.log_configuration(cfg, getattr(task, "arch", None))
        log_params_flat({**task.params(), **({"distributed_world_size": ctx.world_size} if ctx.enabled else {})})
    return None, checkpoint_path


def log_datasets(splits: Splits) -> None:
    """The run's data as MLflow dataset inputs (name, digest, source, split), so the UI shows what trained it."""
    import warnings

    from mlflow.data.numpy_dataset import from_numpy

    data = splits.data
    for context, split in (("training", splits.train), ("validation", splits.validation), ("test", data.test)):
        if split is None:
            continue
        with warnings.catch_warnings():  # MLflow says a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_numpy(
                split.images.cpu().numpy(),
                targets=split.labels.cpu().numpy(),
                source=data.source or data.name,
                name=f"{data.name}-{context}",
            )
        retry_tracking_write(partial(mlflow.log_input, dataset, context=context))


def _last_logged(run_id: str) -> tuple[int, int]:
    """The last optimizer step a run logged training metrics at (``train/lr``) and the last epoch it logged the end
    of (``train/epoch``); a run of an earlier release: the last step of ``train_loss``, the last epoch of
    ``epoch_seconds`` (then logged against the epoch)."""
    client = mlflow.tracking.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train/lr")]
    epochs = [int(m.value) for m in client.get_metric_history(run_id, "train/epoch")]
    steps += [m.step for m in client.get_metric_history(run_id, "train_loss")]
    epochs += [m.step for m in client.get_metric_history(run_id, "epoch_seconds")]
    return max(steps, default=0), max(epochs, default=0)
