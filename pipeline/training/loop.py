"""The epoch loop shared by the entry points: checkpoints, resume, non-finite losses, logging.

A checkpoint is written atomically after every epoch with model, optimizer, scheduler, epoch,
step and RNG state; a resumed run continues from the next epoch and, because batch order is a
function of (seed, epoch) and the RNG state is restored, reproduces an uninterrupted run exactly.
A non-finite loss stops the run with :class:`NonFiniteLossError` before the optimizer step, so
the last checkpoint on disk stays the last good one.

Under ``torchrun`` (``LoopConfig.distributed``) every rank runs the loop on its shard; the non-finite
check is collective (all ranks stop together), logged metrics are averaged over the ranks, ``evaluate`` runs
on every rank (a collective: each rank scores its share of the images), and only rank 0 logs, calls
``on_epoch_end`` and writes checkpoints (with every rank's RNG state).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.models.base import check_weights_fit
from pipeline.training.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    all_gather_object,
    any_rank,
    broadcast_buffers,
    mean_over_ranks,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (or, at a checkpoint, a parameter or optimizer value)."""


def non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimizer-state tensors holding NaN or inf (one host sync per device).

    The tensors are checked where they live: on a GPU the optimizers' step counters stay on the host, so the flags
    are read once per device (a GPU's in one read) rather than stacked across devices.
    """
    named = [(f"model.{k}", v) for k, v in model.state_dict().items()]
    for index, per_param in enumerate(optimizer.state.values()):
        named += [(f"optimizer.state[{index}].{k}", v) for k, v in per_param.items()]
    named = [(k, v) for k, v in named if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, value in named:
        by_device.setdefault(value.device, []).append((name, value))
    bad = []
    for group in by_device.values():
        finite = torch.stack([v.isfinite().all() for _, v in group]).tolist()
        bad += [name for (name, _), ok in zip(group, finite, strict=True) if not ok]
    return bad


def _last_good_checkpoint(path: Path, epoch: int) -> str:
    if path.exists():
        return f"the last good checkpoint (epoch {epoch}) is kept at {path}"
    return "no checkpoint was written (the run failed in its first epoch)"


MetricSink = Callable[[dict[str, float], int], None]


@dataclass
class LoopConfig:
    epochs: int
    checkpoint_path: Path
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    log_every: int = 10  # steps between per-step metric logs
    eval_every: int = 0  # epochs between evaluations (0: only after the last epoch)
    amp: bool = False  # bfloat16 autocast (CUDA only)
    progress: bool = True
    metric_prefix: str = ""  # e.g. "8gaussians/glow/" when several models train inside one run
    loss_name: str = "loss"  # the loss's metric, with its unit: train/bpd, train/cross_entropy_nats
    # the last epoch's metrics that are the trained model's results (its test scores): not logged here but kept in
    # LoopState.model_results (and the checkpoint), for the caller to log with the model it logs
    model_results: Callable[[str], bool] | None = None
    # where metrics go, e.g. experiments.metric_logging.log_metrics (None: nowhere)
    log_metrics: MetricSink | None = None
    distributed: DistributedContext = SINGLE_PROCESS


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    # what a resumed run had already logged past its checkpoint (the interrupted epoch): the redone steps
    # reproduce those values exactly, so they are not logged twice
    logged_step: int = 0
    logged_epoch: int = 0
    model_results: dict[str, float] = field(default_factory=dict)  # see LoopConfig.model_results
    # process CPU seconds, over the processes that made the checkpointed state (a crashed process's CPU after its
    # last checkpoint is not counted): what evaluate() took, and what the processes before this one took in all
    eval_cpu_seconds: float = 0.0
    earlier_cpu_seconds: float = 0.0

    def cpu_seconds(self) -> float:
        """The run's process CPU seconds so far: the earlier processes' (to their last checkpoint) and this one's."""
        return self.earlier_cpu_seconds + time.process_time()


StepFn = Callable[[Any], tuple[Tensor, Mapping[str, Tensor | float]]]  # metrics: detached 0-d tensors (no sync)
EpochHook = Callable[[int, dict[str, float]], None]


def _checkpoint_state(
    model: nn.Module, optimizer, scheduler, state: LoopState, extra: dict, rngs: list[dict]
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "model_results": state.model_results,
        "cpu_seconds": {"eval": state.eval_cpu_seconds, "process": state.cpu_seconds()},
        "rng": rngs[0],
        "rng_per_rank": rngs,
        **extra,
    }


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "rng")


def check_checkpoint_fits(ckpt: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError (one line naming ``path``) unless ``ckpt`` holds what a resume restores, in the shapes of
    ``model`` and ``optimizer``: checked before a resumed run is touched, so a refused resume changes nothing."""
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"the checkpoint {path} lacks {', '.join(missing)}: it cannot continue a run")
    if not isinstance(ckpt["epoch"], int) or not isinstance(ckpt["step"], int) or ckpt["epoch"] < 0:
        raise ValueError(f"the checkpoint {path} records epoch {ckpt['epoch']!r}, step {ckpt['step']!r}")
    check_weights_fit(model, ckpt["model"], f"the checkpoint {path}")
    groups = ckpt["optimizer"].get("param_groups", []) if isinstance(ckpt["optimizer"], dict) else None
    if groups is None or [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"the checkpoint {path} holds the optimizer state of another model")


def restore(
    path: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    ctx: DistributedContext = SINGLE_PROCESS,
    *,
    checkpoint: dict | None = None,
) -> tuple[LoopState, dict]:
    """Load a checkpoint into model/optimizer/scheduler; returns the loop state and the whole dict.

    ``checkpoint``: the file's contents, already read by the caller (``path`` then only names it).

    The file is read onto the CPU and ``load_state_dict`` moves each tensor to its parameter's device, so the
    RNG states stay host byte tensors and the optimizer's step counters stay on the host (a device-resident
    counter would cost a host read per step).
    """
    ckpt = load_checkpoint(path) if checkpoint is None else checkpoint
    check_checkpoint_fits(ckpt, path, model, optimizer)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    per_rank = ckpt.get("rng_per_rank", [ckpt["rng"]])
    if len(per_rank) != ctx.world_size:
        raise ValueError(
            f"the checkpoint at {path} was written by {len(per_rank)} process(es); resume it with the same number "
            f"(this run has {ctx.world_size}) so every rank continues its own random stream"
        )
    set_rng_state(per_rank[ctx.rank])
    results = {k: float(v) for k, v in (ckpt.get("model_results") or {}).items()}  # absent before this release
    cpu = ckpt.get("cpu_seconds") or {}  # absent before this release: the earlier processes' CPU is unknown
    state = LoopState(
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        model_results=results,
        eval_cpu_seconds=float(cpu.get("eval", 0.0)),
        earlier_cpu_seconds=float(cpu.get("process", 0.0)),
    )
    return state, ckpt


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    batches: Callable[[int], Iterable[Any]],
    step_fn: StepFn,
    config: LoopConfig,
    *,
    state: LoopState | None = None,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    checkpoint_extra: dict | None = None,
    on_epoch_end: EpochHook | None = None,
    n_samples: Callable[[Any], int] = lambda batch: len(batch[0]),
) -> LoopState:
    """Train from ``state`` (default: scratch) to ``config.epochs``; metrics go to ``config.log_metrics``.

    ``batches(epoch)`` yields the epoch's batches; ``step_fn(batch) -> (loss, metrics)`` computes
    the loss in train mode; ``evaluate(epoch) -> metrics`` runs every ``eval_every`` epochs and
    after the last. ``scheduler`` steps once per optimizer step. ``state`` is updated in place.

    Every metric is logged against the optimizer step, so that evaluations overlay the training curve: per step
    (every ``log_every``) ``train/<loss_name>``, ``train/<metric>``, ``train/lr``; at each epoch's end the epoch's
    means (``train/<metric>_epoch_mean``), ``train/epoch``, ``train/epoch_seconds``, ``train/images_per_second``
    and ``evaluate``'s metrics, all at the epoch's last step.
    """
    state = state or LoopState()
    device = next(model.parameters()).device
    ctx = config.distributed
    if config.amp and device.type != "cuda":
        log.warning("amp is CUDA-only; training in float32 on %s", device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if config.amp and device.type == "cuda" else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    while state.epoch < config.epochs:
        epoch = state.epoch + 1
        model.train()
        started, seen, count = time.perf_counter(), 0, 0
        totals: dict[str, Any] = {}
        if device.type == "cuda":  # the epoch's own peak (a host call, no sync)
            torch.cuda.reset_peak_memory_stats(device)
        bar = tqdm(
            batches(epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            disable=None if config.progress and ctx.is_main else True,
            leave=False,
        )
        for batch in bar:
            with autocast:
                loss, step_metrics = step_fn(batch)
            # the step's one host sync: a non-finite loss must stop the run before the optimizer step
            if any_rank(~torch.isfinite(loss.detach()), ctx, device):
                raise NonFiniteLossError(
                    f"training loss became {loss.item()} at epoch {epoch}, step {state.step + 1} (on rank {ctx.rank} "
                    f"or another); the run is stopped and "
                    f"{_last_good_checkpoint(config.checkpoint_path, state.epoch)}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics: dict[str, Tensor | float] = {config.loss_name: loss.detach(), **step_metrics}
            if config.grad_clip > 0:
                metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state.step += 1
            seen += n_samples(batch)
            # metrics stay on the device (no host sync per step); they are read every log_every steps
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v)
            count += 1
            if (state.step % config.log_every == 0 or state.step == 1) and state.step > state.logged_step:
                logged = mean_over_ranks(metrics, ctx, device)
                if ctx.is_main and config.log_metrics is not None:
                    config.log_metrics(
                        {f"{config.metric_prefix}train/{k}": v for k, v in logged.items()}
                        | {f"{config.metric_prefix}train/lr": optimizer.param_groups[0]["lr"]},
                        state.step,
                    )
                bar.set_postfix({config.loss_name: f"{logged[config.loss_name]:.4g}"})
        bar.close()
        seconds = time.perf_counter() - started
        epoch_metrics: dict[str, Any] = {f"train/{k}_epoch_mean": v / max(count, 1) for k, v in totals.items()}
        epoch_metrics |= {
            "train/epoch_seconds": seconds,
            "train/images_per_second": seen / seconds if seconds else math.nan,
        }
        epoch_metrics = mean_over_ranks(epoch_metrics, ctx, device)  # one host sync per epoch
        epoch_metrics["train/images_per_second"] *= ctx.world_size  # every rank's images, in the same time
        epoch_metrics["train/epoch"] = epoch  # the step axis is the optimizer step: which epoch ends here
        if device.type == "cuda":  # this process's (rank 0's under torchrun) peak allocation during the epoch
            epoch_metrics["train/gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        # a finite loss can still come with an update that overflowed: never checkpoint (or evaluate) such a state
        bad = non_finite_state(model, optimizer) if ctx.is_main else []
        if any_rank(bool(bad), ctx, device):
            raise NonFiniteLossError(
                f"non-finite values after epoch {epoch} in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) although the loss stayed finite; the run is stopped and "
                f"{_last_good_checkpoint(config.checkpoint_path, state.epoch)}. Lower the learning rate or set "
                "grad_clip"
            )
        broadcast_buffers(model, ctx)  # rank 0's power-iteration vectors on every rank (see the function)
        state.epoch = epoch
        eval_epoch = epoch == config.epochs or (config.eval_every and epoch % config.eval_every == 0)
        if evaluate is not None and eval_epoch:  # on every rank: an evaluation shards its images over the ranks
            cpu = time.process_time()
            epoch_metrics |= evaluate(epoch)
            state.eval_cpu_seconds += time.process_time() - cpu
            epoch_metrics["eval/cpu_seconds"] = state.eval_cpu_seconds  # cumulative over the run
        rngs = all_gather_object(rng_state(), ctx)
        named = {f"{config.metric_prefix}{k}": v for k, v in epoch_metrics.items()}
        if epoch == config.epochs and config.model_results is not None:
            state.model_results = {k: float(v) for k, v in named.items() if config.model_results(k)}
            named = {k: v for k, v in named.items() if k not in state.model_results}
        if ctx.is_main:
            if config.log_metrics is not None and epoch > state.logged_epoch:
                config.log_metrics(named, state.step)
            log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in epoch_metrics.items()))
            try:
                save_checkpoint(
                    config.checkpoint_path,
                    _checkpoint_state(model, optimizer, scheduler, state, checkpoint_extra or {}, rngs),
                )
            except CheckpointWriteError as exc:
                raise CheckpointWriteError(
                    f"{exc}; the run is stopped and {_last_good_checkpoint(config.checkpoint_path, epoch - 1)}"
                ) from None
            if on_epoch_end is not None:
                on_epoch_end(epoch, epoch_metrics)
        ctx.barrier()  # the others wait for rank 0's checkpoint
    return state
