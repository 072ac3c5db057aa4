"""Data-parallel training with PyTorch's own engine: ``torchrun`` + ``DistributedDataParallel``.

    torchrun --nproc_per_node 8 -m experiments.density --preset paper-cifar10 --data-dir ~/data
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m experiments.classify ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` reads them (a
plain ``python -m ...`` is a world of one, and nothing here changes its behaviour). NCCL on GPUs
(one per process, ``cuda:LOCAL_RANK``), gloo on CPUs.

What keeps the replicas one model:

* ``batch_size`` is the *global* batch: each step's batch is split across the ranks
  (:func:`shard_batches`), so a run means the same thing at any world size;
* the model is wrapped after its data-dependent initialisation, so DDP broadcasts rank 0's
  parameters and buffers (ActNorm, spectral-norm vectors) at the start; gradients are averaged, so every
  rank takes the same optimizer step and runs the same power iteration; :func:`broadcast_buffers` re-sends
  rank 0's buffers (``u``, ``v``, ``sigma``) once per epoch, so kernels that are not bitwise deterministic
  cannot let the replicas drift apart for longer than an epoch;
* :func:`replica_deviation` checks it: the largest difference of any parameter or buffer across
  ranks, logged at the end of a run;
* each rank draws its own noise (dequantisation, Hutchinson probes, roulette lengths) from a
  rank-specific seed; checkpoints keep every rank's RNG state, so a resume is exact.

Only rank 0 logs to MLflow, evaluates, and writes checkpoints and artifacts; the others wait at a
barrier. Multi-node resume needs the checkpoint directory on a shared filesystem.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.training.device import resolve_device

BARRIER_TIMEOUT = datetime.timedelta(hours=3)  # rank 0 evaluates while the others wait
LAUNCHER_GRACE_S = 30.0  # after its launcher is gone, how long a rank has to stop on SIGTERM before it is ended

log = logging.getLogger(__name__)


def watch_launcher(launcher_pid: int, *, poll_s: float = 1.0, grace_s: float = LAUNCHER_GRACE_S) -> threading.Thread:
    """End this process when ``launcher_pid`` (torchrun's agent, its parent) is gone: SIGTERM first (a rank between
    steps stops as on Ctrl-C, its run marked KILLED), then, if it is still here ``grace_s`` later (blocked in a
    collective with a peer that died with the launcher, where no signal handler runs), ``os._exit(143)``; the
    run's last checkpoint stays, and the OS drops its lease. Without this a rank waits :data:`BARRIER_TIMEOUT`."""

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(poll_s)
        log.error("the launcher (pid %d) is gone: rank %s stops", launcher_pid, os.environ.get("RANK", "?"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        log.error(
            "rank %s did not stop within %.0f s of SIGTERM (blocked in a collective): it exits",
            os.environ.get("RANK", "?"),
            grace_s,
        )
        logging.shutdown()
        os._exit(143)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE_PROCESS = DistributedContext()
_WATCHED: list[threading.Thread] = []


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str) -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS, resolve_device(device_name)
    ctx = DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_name)
    if not _WATCHED:  # torchrun's agent is every rank's parent
        _WATCHED.append(watch_launcher(os.getppid()))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=BARRIER_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return ctx, device


def shutdown(ctx: DistributedContext, *, clean: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others (rank 0 still
    logs its final artifacts when the others are done): a rank that tore its group down and exited while
    a peer still used the group's connections aborted at exit ("terminate called without an active
    exception"). After an error there is no barrier: a peer may never reach it."""
    if not (ctx.enabled and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    gc.collect()  # a data-parallel wrapper in a reference cycle holds the group: its threads end now, not at exit
    dist.destroy_process_group()


@contextmanager
def distributed_session(device_name: str) -> Iterator[tuple[DistributedContext, torch.device]]:
    """``(context, device)`` for an entry point's run: joins torchrun's process group (if any), leaves it after."""
    ctx, device = init_distributed(device_name)
    try:
        yield ctx, device
    except BaseException:
        shutdown(ctx, clean=False)
        raise
    shutdown(ctx)


def wrap_model(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (after its initialisation), or ``model`` itself alone.

    On GPUs, BatchNorm layers (the classifier's head, the vanilla ResNet-BN's branches) become
    SyncBatchNorm in place (same parameters and buffers), so batch statistics are the global batch's.
    PyTorch's SyncBatchNorm is GPU-only: on CPUs each rank keeps the running statistics of its own
    shard, and rank 0's are the ones saved.

    Buffers are not re-broadcast at every forward (``broadcast_buffers=False``): at the paper-cifar10
    preset that is 1,248 buffers, 85 MiB per forward. DDP broadcasts them once at construction and the
    training loop once per epoch (:func:`broadcast_buffers`); ``log_replica_consistency`` checks that the
    replicas agree at the end of every run.
    """
    if not ctx.enabled:
        return model
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )


def check_global_batch(batch_size: int, ctx: DistributedContext) -> None:
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size {batch_size} is the global batch and must divide evenly among {ctx.world_size} processes"
        )


def shard_batches(batches: Callable[[int], Iterable[Any]], ctx: DistributedContext) -> Callable[[int], Iterable[Any]]:
    """Each rank's part of every global batch (tuples of tensors split along the batch dimension)."""
    if not ctx.enabled:
        return batches

    def sharded(epoch: int) -> Iterator[Any]:
        for batch in batches(epoch):
            yield tuple(t.tensor_split(ctx.world_size)[ctx.rank] for t in batch)

    return sharded


def broadcast_object(obj: Any, ctx: DistributedContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, ctx: DistributedContext) -> list[Any]:
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(
    values: dict[str, float | torch.Tensor], ctx: DistributedContext, device: torch.device
) -> dict[str, float]:
    """Scalar metrics (floats or 0-d tensors on ``device``) averaged over the ranks, as floats: one host sync
    for all of them (every rank must call it with the same keys)."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    if ctx.enabled:
        dist.all_reduce(t)
        t = t / ctx.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def sum_over_ranks(t: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """``t`` summed over the ranks, on every rank (``t`` itself in a world of one); one all-reduce, no host sync."""
    if ctx.enabled:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool | torch.Tensor, ctx: DistributedContext, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop together).

    A tensor flag (a 0-d bool on the device, e.g. ``~torch.isfinite(loss)``) is reduced where it lies and read
    once: one all-reduce and one host sync per call, none before the reduction.
    """
    if not ctx.enabled:
        return bool(flag)
    t = (flag.reshape(1) if torch.is_tensor(flag) else torch.tensor([bool(flag)], device=device)).to(torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(model: nn.Module, ctx: DistributedContext) -> None:
    """Rank 0's floating-point buffers (the power iteration's ``u``, ``v``, ``sigma``; running statistics) on every
    rank, in one broadcast per dtype.

    Training wraps the model with ``broadcast_buffers=False``: re-sending 1,248 buffers (85 MiB at paper-cifar10)
    at every forward is too dear. Every rank then runs the same power iteration on the same weights, but kernels
    that are not bitwise deterministic (cuDNN's, atomics) let the vectors drift apart; the loop calls this once
    per epoch, before the checkpoint, so the replicas never drift for longer than an epoch.
    """
    if not ctx.enabled:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for buffer in model.buffers():
        if buffer.numel() and buffer.is_floating_point():  # flags and counters do not drift
            by_dtype.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.detach().copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def _replicated_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers every rank must hold identically (BatchNorm's running statistics excepted:
    without SyncBatchNorm each rank updates them from its own shard after the last broadcast)."""
    running = {
        id(b)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
        if b is not None
    }
    return [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point() and id(t) not in running]


def replica_deviation(model: nn.Module, ctx: DistributedContext) -> float:
    """Largest absolute difference of any replicated tensor between a rank and rank 0 (max over ranks).

    Covers every parameter and buffer, the spectral normalisation's ``u``, ``v`` and ``sigma`` included.
    """
    if not ctx.enabled:
        return 0.0
    worst = 0.0
    for tensor in _replicated_tensors(model):
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        worst = max(worst, float((tensor.detach() - reference).abs().max()) if tensor.numel() else 0.0)
    t = torch.tensor([worst], dtype=torch.float64, device=next(model.parameters()).device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
