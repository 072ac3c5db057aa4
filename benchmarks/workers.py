"""Several training workers on one machine: aggregate throughput with the thread budget, and without it.

    python -m benchmarks.workers                          # 1, 2 and 4 workers, the density quick flow
    python -m benchmarks.workers --workers 1 2 4 8 --steps 60 --json workers.json

Every worker is a separate process training the ``density`` quick preset's flow on the embedded digits
for ``--steps`` steps (the work of a sweep trial, without the tracking store). N workers start
together; the aggregate throughput is all their images over the time the last one needed.

* ``budget``: each worker takes ``--threads 0`` (the default), i.e. the machine's cores divided
  among the local workers (``IRESNET_LOCAL_WORKERS=N``, as the recipe in docs/sweeps.md sets), at least 1.
* ``no budget``: every worker uses PyTorch's default (all cores), as before ``--threads`` existed.

"linear" is N times the throughput of one worker with one thread, up to the number of cores: what N
independent workers could reach if nothing were shared. The target: >= 0.9x linear up to the number
of cores, and no collapse beyond. Wall-clock throughput is the right measure here, because sharing
the machine is what is measured; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from benchmarks.common import emit
from pipeline.logging_setup import setup_logging
from pipeline.training.device import usable_cores

log = logging.getLogger("benchmarks.workers")


def worker(steps: int, threads: int | None) -> dict:
    """One worker: the quick preset's flow, ``steps`` training steps. ``threads``: 0 the budget rule, > 0 that
    many, ``None`` PyTorch's default (every core)."""
    import torch

    from experiments.density import config_from_preset
    from pipeline.data import load_dataset
    from pipeline.data.preprocessing import dequantize, iterate_batches
    from pipeline.metrics import bits_per_dim
    from pipeline.models import IResNetFlow
    from pipeline.training.device import apply_thread_budget
    from pipeline.training.numerics import flush_denormals

    used = torch.get_num_threads() if threads is None else apply_thread_budget(threads)
    flush_denormals()
    cfg = config_from_preset("quick")
    data = load_dataset(cfg.dataset, None)
    torch.manual_seed(0)
    model = IResNetFlow(cfg.flow_architecture(tuple(data.train.images.shape[1:])), estimator=cfg.training_estimator())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = [dequantize(x, data.n_levels) for x, _ in iterate_batches(data.train, cfg.batch_size, shuffle=False)]
    with torch.no_grad():
        model(images[0])  # data-dependent initialisation
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x = images[step % len(images)]
        loss = bits_per_dim(model.log_prob(x), model.dim, data.n_levels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {
        "threads": used,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "images": steps * cfg.batch_size,
    }


def run_group(n: int, steps: int, threads: int | None) -> dict:
    """``n`` workers started together; aggregate images/s over the slowest worker's time."""
    env = dict(os.environ, IRESNET_LOCAL_WORKERS=str(n))
    command = [sys.executable, "-m", "benchmarks.workers", "--worker", "--steps", str(steps)]
    command += ["--worker-threads", "default" if threads is None else str(threads)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"a worker failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    makespan = max(r["seconds"] for r in results)
    return {
        "workers": n,
        "threads": "default (all cores)" if threads is None else ("budget" if threads == 0 else threads),
        "threads_per_worker": results[0]["threads"],
        "images_per_second": sum(r["images"] for r in results) / makespan,
        "slowest_worker_seconds": makespan,
        "cpu_seconds_per_image": sum(r["cpu_seconds"] for r in results) / sum(r["images"] for r in results),
    }


def run(args: dict) -> list[dict]:
    cores = usable_cores()
    unit = run_group(1, args["steps"], threads=1)  # one worker, one thread: the unit of "linear"
    unit["role"] = "unit (1 worker, 1 thread)"
    rows = [unit]
    for n in args["workers"]:
        for threads in (0, None) if args["no_budget"] else (0,):
            row = run_group(n, args["steps"], threads)
            row["linear_images_per_second"] = min(n, cores) * unit["images_per_second"]
            row["fraction_of_linear"] = row["images_per_second"] / row["linear_images_per_second"]
            rows.append(row)
            log.info(
                "%d worker(s), threads %s: %.1f images/s (%.2fx linear)",
                n,
                row["threads"],
                row["images_per_second"],
                row["fraction_of_linear"],
            )
    return rows


def format_table(rows: list[dict], cores: int) -> str:
    header = f"{'workers':>7} {'threads':>20} {'per worker':>10} {'images/s':>9} {'x linear':>8} {'CPU ms/image':>12}"
    out = [f"{cores} cores", header, "-" * len(header)]
    for r in rows:
        linear = r.get("fraction_of_linear")
        out.append(
            f"{r['workers']:>7} {str(r['threads']):>20} {r['threads_per_worker']:>10} {r['images_per_second']:9.1f} "
            f"{'' if linear is None else f'{linear:.2f}':>8} {1e3 * r['cpu_seconds_per_image']:12.1f}"
            + (f"  {r['role']}" if "role" in r else "")
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=40, help="training steps per worker")
    parser.add_argument("--no-budget", action="store_true", help="also run every worker with all cores' threads")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", default="0", help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    if args["worker"]:
        threads = None if args["worker_threads"] == "default" else int(args["worker_threads"])
        print(json.dumps(worker(args["steps"], threads)))
        return
    if args["steps"] < 1 or min(args["workers"]) < 1:
        parser.error("--steps and --workers must be >= 1")
    setup_logging()
    rows = run(args)
    emit(format_table(rows, usable_cores()), args["json"], {"config": args, "cores": usable_cores(), "results": rows})


if __name__ == "__main__":
    main()
