"""Data-parallel plumbing: sharding, the global batch, per-rank RNG in checkpoints (single process; the
two-process runs through torchrun are in tests/experiments/test_distributed.py)."""

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
