"""Data-parallel plumbing: sharding, the global batch, per-rank RNG in checkpoints (single process; the
two-process runs through torchrun are in tests/experiments/test_distributed.py)."""

import os
import time
from pathlib import Path

import pytest
import torch

from pipeline.training.checkpoint import rng_state, save_checkpoint
from pipeline.training.distributed import DistributedContext, check_global_batch, shard_batches
from pipeline.training.loop import restore


def test_every_rank_gets_a_disjoint_part_of_each_global_batch():
    images, labels = torch.arange(10).reshape(10, 1), torch.arange(10)

    def batches(epoch):
        yield images, labels
        yield images[:6], labels[:6]

    shards = [list(shard_batches(batches, DistributedContext(rank=r, world_size=2))(1)) for r in (0, 1)]
    for step in range(2):
        parts = [shards[r][step][1] for r in (0, 1)]
        assert torch.equal(torch.cat(parts), labels[: 10 if step == 0 else 6])  # together: the global batch
        assert len(parts[0]) == len(parts[1])
    single = DistributedContext()
    assert shard_batches(batches, single) is batches


def test_the_global_batch_must_divide_among_the_processes():
    check_global_batch(64, DistributedContext(rank=0, world_size=4))
    with pytest.raises(ValueError, match="global batch"):
        check_global_batch(63, DistributedContext(rank=0, world_size=4))


def test_a_checkpoint_resumes_only_with_its_number_of_processes(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = rng_state()
    save_checkpoint(
        tmp_path / "last.pt",
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None,
            "epoch": 1,
            "step": 3,
            "rng": state,
            "rng_per_rank": [state, state],
        },
    )
    with pytest.raises(ValueError, match="written by 2 process"):
        restore(tmp_path / "last.pt", model, optimizer, None)
    loop_state, _ = restore(tmp_path / "last.pt", model, optimizer, None, DistributedContext(rank=1, world_size=2))
    assert (loop_state.epoch, loop_state.step) == (1, 3)


def _two_ranks(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    from pipeline.training.distributed import any_rank, broadcast_buffers
    from pipeline.training.host_syncs import counting_host_syncs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistributedContext(rank=rank, world_size=2)
    try:
        flag = torch.tensor(rank == 1)  # true on one rank only
        with counting_host_syncs("cpu") as syncs:
            stop = any_rank(flag, ctx, torch.device("cpu"))
        layer = torch.nn.BatchNorm1d(3)
        layer.running_mean.fill_(float(rank))  # drifted apart
        broadcast_buffers(layer, ctx)
        results.put((rank, stop, syncs["n"], layer.running_mean.tolist(), int(layer.num_batches_tracked)))
    finally:
        dist.destroy_process_group()


def test_any_rank_reads_once_and_buffers_follow_rank_0(tmp_path):
    """Two gloo processes: the non-finite flag is reduced on the device and read once (it was read, reduced and
    read again), and one broadcast puts rank 0's floating-point buffers on every rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=_two_ranks, args=(r, str(tmp_path / "init"), results)) for r in range(2)]
    for p in processes:
        p.start()
    got = sorted(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    assert [stop for _, stop, *_ in got] == [True, True]  # every rank stops when one must
    assert [n for _, _, n, *_ in got] == [1, 1]
    assert [mean for *_, mean, _ in got] == [[0.0, 0.0, 0.0]] * 2


def test_a_rank_whose_launcher_is_killed_exits_even_if_it_cannot_take_sigterm(tmp_path):
    """A rank blocked where no signal handler runs (here: SIGTERM ignored) is ended after the grace period once its
    launcher (its parent) dies, instead of waiting in a collective for the process group's timeout (hours)."""
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "rank.pid"
    rank = (
        "import os, signal, threading\n"
        "from pipeline.training.distributed import watch_launcher\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "watch_launcher(os.getppid(), poll_s=0.05, grace_s=0.2)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "threading.Event().wait()\n"  # blocked for good, as in a collective whose peer is gone
    )
    launcher = (
        "import subprocess, sys, time\n"
        f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}])\n"
        "print(rank.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    rank_pid = int(proc.stdout.readline())
    for _ in range(600):  # the rank has started its watch
        if pid_file.exists():
            break
        time.sleep(0.1)
    assert pid_file.exists(), "the rank did not start its watch"
    proc.send_signal(signal.SIGKILL)  # the launcher is killed: nothing of it runs to stop the rank
    proc.wait()
    for _ in range(600):  # a liveness bound (60 s), not a speed claim: the rank is gone long before
        try:
            if Path(f"/proc/{rank_pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break  # exited; a container's init may not reap it
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        os.kill(rank_pid, signal.SIGKILL)
        raise AssertionError("the rank outlived its launcher")
