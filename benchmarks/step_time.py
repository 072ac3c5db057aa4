"""Training-step time and memory: vanilla ResNet vs i-ResNet classifier vs i-ResNet flow (with each log-det option).

    python -m benchmarks.step_time                       # CPU-sized defaults, current device
    python -m benchmarks.step_time --device cuda --image 3 32 32 --blocks 7 7 7 --hidden 32 64 128 --batch 128
    python -m benchmarks.step_time --json results.json
    python -m benchmarks.step_time --train-steps 300 [--no-flush]   # also step each model after training

Every case uses the same residual stages (blocks and bottleneck widths per stage), the same input and
the same batch; each runs in a fresh subprocess so its memory is its own. Ratios are to case (a).
The flow's levels factor out half their channels, so its later stages carry fewer channels than
the classifier's: the comparison is of the same blocks, bottleneck widths and batch, not of
identical FLOPs. Memory: ``peak`` is CUDA's peak allocation on a GPU and the process's peak RSS on
CPU (which includes the PyTorch runtime); ``+MiB`` is the growth from before the first step to the
peak (activations, graphs, gradients and optimizer state), the number the memory targets compare.

With ``--train-steps N`` every model is also timed after N training steps (SGD, lr 0.1, momentum 0.9,
weight decay 5e-4, on its benchmark batch): a trained network can produce subnormal floats (ELU's
gradient at very negative pre-activations) that a fresh one does not. Each process flushes subnormals
to zero in every thread first, as the entry points do (``--no-flush`` shows the cost without).

Host syncs (``syncs/step``, ``cuda/step``): each case also trains a few steps through the library's
``fit`` (``--sync-steps``, 0 skips it). ``syncs/step`` counts at PyTorch's dispatcher every operation that makes
the host wait for a GPU, from any code (:func:`pipeline.training.host_syncs.counting_host_syncs`: on a CPU, as if
the tensors were on a GPU); ``cuda/step`` is what CUDA's sync debug mode sees (GPU only). Per-epoch work is
differenced out.

``spectral`` is the share of a step spent in the spectral normalisation (power iteration, sigma, the normalised
weight and their backward); ``h2d ms`` (GPU only) is what copying the batch from pageable host memory would cost
per step (a training keeps its images on the GPU instead).

The issue's targets, each a ratio measured in the same run, are printed below the table:
i-ResNet / ResNet classifier step <= 1.3; 5-term flow step / classifier step <= 3; memory growth of
a flow step with the memory-saving (Neumann) gradient / without it (backprop through 5 terms) <= 0.5.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import emit, in_fresh_process, memory_now_mib, memory_peak_mib
from benchmarks.tables import markdown_table
from pipeline.logging_setup import setup_logging
from pipeline.models import ClassifierArchitecture, FlowArchitecture, IResNetFlow, ResidualClassifier
from pipeline.models.base import n_parameters
from pipeline.training.device import resolve_device
from pipeline.training.host_syncs import counting_cuda_syncs, counting_host_syncs
from pipeline.training.loop import LoopConfig, fit
from pipeline.training.numerics import flush_denormals
from pipeline.transforms import LogDetEstimator, PowerSeriesLogDet, RussianRouletteLogDet

log = logging.getLogger("benchmarks.step_time")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "resnet", "iresnet", "flow"
    estimator: LogDetEstimator | None = None
    lipschitz: str = "soft"  # "strict": a certified bound divides every training forward


CASES = [
    Case("(a) vanilla ResNet", "resnet"),
    Case("(b) i-ResNet classifier", "iresnet"),
    Case("(b) i-ResNet classifier, strict", "iresnet", lipschitz="strict"),
    Case("(c) flow, 1 term", "flow", PowerSeriesLogDet(n_terms=1)),
    Case("(c) flow, 5 terms, backprop", "flow", PowerSeriesLogDet(n_terms=5)),
    Case("(c) flow, 5 terms, Neumann", "flow", PowerSeriesLogDet(n_terms=5, gradient="neumann")),
    Case("(c) flow, 10 terms, backprop", "flow", PowerSeriesLogDet(n_terms=10)),
    Case("(c) flow, 10 terms, Neumann", "flow", PowerSeriesLogDet(n_terms=10, gradient="neumann")),
    Case("(c) flow, 5 terms, Neumann, strict", "flow", PowerSeriesLogDet(n_terms=5, gradient="neumann"), "strict"),
    Case("(d) flow, roulette, Neumann", "flow", RussianRouletteLogDet(n_exact_terms=2, gradient="neumann")),
]
# (name, numerator case, denominator case, quantity, target): the acceptance ratios; a quantity pair
# (numerator's, denominator's) compares two measurements of one case
TARGETS = [
    ("i-ResNet / ResNet classifier step", "(b) i-ResNet classifier", "(a) vanilla ResNet", "seconds_per_step", 1.3),
    (
        "5-term flow (Neumann) / classifier step",
        "(c) flow, 5 terms, Neumann",
        "(b) i-ResNet classifier",
        "seconds_per_step",
        3.0,
    ),
    (
        "5-term flow (backprop) / classifier step",
        "(c) flow, 5 terms, backprop",
        "(b) i-ResNet classifier",
        "seconds_per_step",
        None,
    ),
    (
        "strict / soft i-ResNet classifier step",
        "(b) i-ResNet classifier, strict",
        "(b) i-ResNet classifier",
        "seconds_per_step",
        None,
    ),
    (
        "strict / soft 5-term flow step",
        "(c) flow, 5 terms, Neumann, strict",
        "(c) flow, 5 terms, Neumann",
        "seconds_per_step",
        None,
    ),
    (
        "trained / fresh i-ResNet classifier step",
        "(b) i-ResNet classifier",
        "(b) i-ResNet classifier",
        ("seconds_per_step_trained", "seconds_per_step"),
        1.1,
    ),
    (
        "memory, Neumann / backprop (5 terms)",
        "(c) flow, 5 terms, Neumann",
        "(c) flow, 5 terms, backprop",
        "memory_above_start_mib",
        0.5,
    ),
    (
        "memory, Neumann / backprop (10 terms)",
        "(c) flow, 10 terms, Neumann",
        "(c) flow, 10 terms, backprop",
        "memory_above_start_mib",
        0.5,
    ),
]


def _measure(case: Case, args: dict, queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args["threads"]) if args["threads"] else None
    if args["flush"]:
        flush_denormals()
    device = resolve_device(args["device"])
    shape = tuple(args["image"])
    blocks, hidden = tuple(args["blocks"]), tuple(args["hidden"])
    x = torch.rand(args["batch"], *shape, device=device) - 0.5
    y = torch.randint(0, 10, (args["batch"],), device=device)
    if case.kind == "flow":
        arch = FlowArchitecture(
            input_shape=shape,
            n_blocks=blocks,
            hidden_channels=hidden,
            n_power_iterations=args["power_iterations"],
            lipschitz=case.lipschitz,
        )
        flow = IResNetFlow(arch, estimator=case.estimator).to(device)
        model: nn.Module = flow

        def loss_fn() -> Tensor:
            return -flow.log_prob(x).mean()
    else:
        classifier_arch = ClassifierArchitecture(
            input_shape=shape,
            num_classes=10,
            n_blocks=blocks,
            hidden_channels=hidden,
            strides=(1,) + (2,) * (len(blocks) - 1),
            injective_padding=0,
            init_squeeze=True,
            coeff=0.9 if case.kind == "iresnet" else None,
            n_power_iterations=args["power_iterations"],
            lipschitz=case.lipschitz,
        )
        model = ResidualClassifier(classifier_arch).to(device)

        def loss_fn() -> Tensor:
            return F.cross_entropy(model(x), y)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the sync count trains from the initial weights: the timed steps (random data, no schedule) can diverge
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def step(opt: torch.optim.Optimizer = optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    def median_step_seconds() -> float:
        times = []
        for _ in range(args["steps"]):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    sync()
    base = memory_now_mib(device)  # before the first step: parameters and inputs only
    for _ in range(args["warmup"]):
        step()
    sync()
    seconds = median_step_seconds()
    peak = memory_peak_mib(device)
    costs = step_costs(model, x, device, args["steps"])
    model.load_state_dict(initial)
    syncs = syncs_per_step(model, loss_fn, device, args["sync_steps"]) if args["sync_steps"] else {}
    trained = {}
    if args["train_steps"]:
        trainer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(args["train_steps"]):
            step(trainer)
        sync()
        trained = {"seconds_per_step_trained": median_step_seconds()}
    queue.put(
        {
            **trained,
            **syncs,
            **costs,
            "case": case.name,
            "seconds_per_step": seconds,
            "images_per_second": args["batch"] / seconds,
            "peak_memory_mib": peak,
            "memory_above_start_mib": peak - base,
            "n_parameters": n_parameters(model),
            "device": str(device),
        }
    )


def step_costs(model: torch.nn.Module, x: Tensor, device: torch.device, repeats: int) -> dict:
    """What parts of a step cost, in seconds (medians of ``repeats``).

    ``spectral_seconds``: the spectral normalisation of every layer as a training step runs it (the stacked power
    iteration, each layer's ``u^T A(W) v`` and the normalised weight, and their backward). ``pageable_copy_seconds``
    (GPU only): copying the step's batch from pageable host memory, what every step paid before the training images
    were kept on the device (a batch is now an index into device memory).
    """
    from pipeline.layers.spectral import batched_power_iteration, spectral_layers

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layers = spectral_layers(model)

    def median_seconds(work: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            work()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def spectral() -> None:
        batched_power_iteration(model)
        torch.stack([layer.normalized_weight().sum() for layer in layers]).sum().backward()

    costs = {"spectral_seconds": median_seconds(spectral) if layers else 0.0, "pageable_copy_seconds": math.nan}
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        host = x.cpu()

        def copy_batch() -> None:
            host.to(device, non_blocking=True)

        costs["pageable_copy_seconds"] = median_seconds(copy_batch)
    return costs


def _n_batches(n: int, epoch: int) -> list[tuple[None]]:
    return [(None,)] * n


def syncs_per_step(model: torch.nn.Module, loss_fn: Callable[[], Tensor], device: torch.device, steps: int) -> dict:
    """Host syncs of one training step as :func:`pipeline.training.loop.fit` runs it (metrics, checks, optimizer).

    Two epochs of ``steps`` and ``2 * steps`` steps are counted and differenced, so the per-epoch work
    (checkpoint, epoch metrics) cancels: ``host_syncs_per_step`` counts at the dispatcher (any device),
    ``cuda_syncs_per_step`` the synchronisations CUDA reports (on a GPU only).
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step(_batch: Any) -> tuple[Tensor, dict]:
        loss = loss_fn()
        return loss, {"loss_copy": loss.detach()}  # a metric, as every entry point's step returns

    counts: dict[str, list[int]] = {"host_syncs": [], "cuda_syncs": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = LoopConfig(epochs=1, checkpoint_path=Path(tmp) / "last.pt", log_every=10, progress=False)
        fit(model, optimizer, None, lambda epoch: [(None,)], step, config, n_samples=lambda b: 1)  # one-time reads
        for n in (steps, 2 * steps):
            cuda = counting_cuda_syncs() if device.type == "cuda" else nullcontext({"n": 0})
            with counting_host_syncs(device) as host, cuda as syncs:
                fit(model, optimizer, None, partial(_n_batches, n), step, config, n_samples=lambda b: 1)
            counts["host_syncs"].append(host["n"])
            counts["cuda_syncs"].append(syncs["n"])
    per_step = {f"{k}_per_step": (b - a) / steps for k, (a, b) in counts.items()}
    if device.type != "cuda":
        per_step["cuda_syncs_per_step"] = math.nan
    return per_step


def run(args: dict) -> list[dict]:
    results = []
    for case in CASES:
        result = in_fresh_process(_measure, case, args)
        results.append(result)
        log.info("%s: %.3f s/step", case.name, result["seconds_per_step"])
    ref_time, ref_mem = results[0]["seconds_per_step"], results[0]["memory_above_start_mib"]
    for r in results:
        r["time_ratio"] = r["seconds_per_step"] / ref_time
        r["memory_ratio"] = r["memory_above_start_mib"] / ref_mem
    return results


def check_targets(results: list[dict]) -> list[dict]:
    """The issue's ratios, each from this run's own measurements."""
    by_name = {r["case"]: r for r in results}
    rows = []
    for name, numerator, denominator, quantity, target in TARGETS:
        top, bottom = quantity if isinstance(quantity, tuple) else (quantity, quantity)
        if top not in by_name[numerator]:  # e.g. no --train-steps
            continue
        ratio = by_name[numerator][top] / by_name[denominator][bottom]
        rows.append(
            {"ratio": name, "value": ratio, "target": target, "met": None if target is None else ratio <= target}
        )
    return rows


def _finite(value: float) -> bool:
    return value == value and not math.isinf(value)


def case_table(results: list[dict]) -> str:
    """The cases as a markdown table (the printout and docs/benchmarks.md); GPU-only columns where measured."""
    gpu = any(_finite(r.get("cuda_syncs_per_step", math.nan)) for r in results)
    trained = any("seconds_per_step_trained" in r for r in results)
    header = ["case", "s/step", "images/s", "× (a)", "peak MiB", "+MiB", "× +MiB", "host syncs/step"]
    header += ["CUDA syncs/step", "h2d ms"] if gpu else []
    header += ["spectral share"] + (["trained s/step"] if trained else [])
    rows = []
    for r in results:
        row = [
            r["case"],
            f"{r['seconds_per_step']:.3f}",
            f"{r['images_per_second']:.1f}",
            f"{r['time_ratio']:.2f}",
            f"{r['peak_memory_mib']:.0f}",
            f"{r['memory_above_start_mib']:.0f}",
            f"{r['memory_ratio']:.2f}",
            f"{r['host_syncs_per_step']:.1f}" if "host_syncs_per_step" in r else "",
        ]
        if gpu:
            row += [
                f"{r.get('cuda_syncs_per_step', math.nan):.1f}",
                f"{1e3 * r.get('pageable_copy_seconds', math.nan):.2f}",
            ]
        row.append(f"{r['spectral_seconds'] / r['seconds_per_step']:.0%}" if "spectral_seconds" in r else "")
        if trained:
            row.append(f"{r['seconds_per_step_trained']:.3f}" if "seconds_per_step_trained" in r else "")
        rows.append(row)
    return markdown_table(header, rows)


def ratio_table(targets: list[dict]) -> str:
    """The targets' ratios, each from one run's own measurements, as a markdown table."""
    rows = [
        (
            t["ratio"],
            f"{t['value']:.2f}",
            "" if t["target"] is None else f"≤ {t['target']:g}",
            "" if t["met"] is None else ("yes" if t["met"] else "**no**"),
        )
        for t in targets
    ]
    return markdown_table(("ratio", "measured", "target", "met"), rows)


def format_table(results: list[dict], targets: list[dict]) -> str:
    return case_table(results) + "\n" + ratio_table(targets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image", type=int, nargs=3, default=[3, 32, 32])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 4, 4])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--power-iterations", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    parser.add_argument(
        "--sync-steps", type=int, default=5, help="steps per counted epoch for syncs/step through fit (0: skip)"
    )
    parser.add_argument("--train-steps", type=int, default=0, help="also time each model after this many steps")
    parser.add_argument("--no-flush", dest="flush", action="store_false", help="keep subnormal floats")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args(argv))
    if len(args["blocks"]) != len(args["hidden"]):
        parser.error("--blocks and --hidden need one value per stage")
    setup_logging()
    results = run(args)
    targets = check_targets(results)
    emit(format_table(results, targets), args["json"], {"config": args, "results": results, "targets": targets})


if __name__ == "__main__":
    main()
