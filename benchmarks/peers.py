"""Against the peers, on one machine in one run: normflows (``Residual``) and FrEIA (``IResNetLayer``).

    pip install -e '.[bench]'                  # the peers, pinned
    python -m benchmarks.peers                 # 2-D toy (8gaussians), 10 blocks of 2-64-64-64-2, c = 0.9
    python -m benchmarks.peers --steps 1000 --device cuda --json peers.json

Every row trains the same architecture on the same stream of 2-D samples (same seed, batch, Adam
learning rate and number of steps): ``--blocks`` residual blocks whose branch is an MLP
``2-64-64-64-2`` with each linear map spectrally normalised to ``c``, a standard-normal base, no
ActNorm. Each peer is paired with our library configured the same way:

* FrEIA's ``IResNetLayer``: ELU, truncated series with ``--terms`` terms and Rademacher probes,
  Lipschitz correction after every optimizer step. Its log-det is computed without a graph, so its
  training gradient ignores the log-det (FrEIA 0.2): the ``logdet grad`` column says so.
* normflows' ``Residual`` (Residual Flows' code): pre-activation LipSwish, 5 power iterations per
  step (``update_lipschitz`` after every optimizer step, as the library requires), unbiased Russian
  roulette (geometric p = 0.5, 2 exact terms) with the Neumann gradient computed in the forward
  pass; also with its exact 2-D log-det (``brute_force``).

Columns: the median step time, taken with every row in **one process, the rows' steps in turn** (step 1
of every row, then step 2, ...), so that the machine's drift (10-30% between processes on a shared
machine) hits all rows alike and the ratios hold; on CPU with one thread (the default) the clock is the
process's CPU time, elsewhere wall time (CUDA synchronised). ``--repeats`` such runs, the median shown.
Then, each row in its own process: memory growth from before the first step to the peak (CUDA
allocations, or the process's RSS on CPU); the test NLL after training, in nats, from the *exact* 2-D
log-det of each library's own forward map (the same harness for all); the error of each library's
training log-det estimate against that exact value (mean and mean absolute, nats, in training mode); and
each library's inverse on the test latents: max absolute error and time.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import emit, in_fresh_process, memory_now_mib, memory_peak_mib
from benchmarks.tables import markdown_table
from pipeline.data.toy import sample_toy
from pipeline.layers.branches import mlp_branch
from pipeline.layers.spectral import SpectralConfig
from pipeline.logging_setup import setup_logging
from pipeline.training.device import resolve_device
from pipeline.transforms import (
    ExactLogDet,
    FixedPointConfig,
    InvertibleResidualBlock,
    LogDetEstimator,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    TransformSequence,
)

log = logging.getLogger("benchmarks.peers")

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z**2 + _LOG_2PI).sum(dim=1)


def exact_log_prob(forward_map: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``log p(x)`` and ``log|det J|`` of a 2-D flow from its forward map alone (brute-force Jacobian)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = forward_map(x)
        rows = [torch.autograd.grad(z[:, i].sum(), x, retain_graph=True)[0] for i in range(2)]
    jac = torch.stack(rows, dim=1)  # (B, 2, 2)
    logdet = torch.log(torch.abs(jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]))
    return (standard_normal_log_prob(z.detach()) + logdet).detach(), logdet.detach()


@dataclass
class Adapter:
    """One library's flow behind a common interface."""

    module: nn.Module
    forward: Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (z, log-det by the library's training estimator)
    forward_map: Callable[[Tensor], Tensor]  # x -> z, to check everything against the exact log-det
    invert: Callable[[Tensor], Tensor]  # z -> x, the library's own inverse
    after_step: Callable[[], None] = field(default=lambda: None)
    logdet_gradient: bool = True  # does the training loss differentiate through the log-det?

    def loss(self, x: Tensor) -> Tensor:
        """The training NLL (mean), with the library's own estimator."""
        z, logdet = self.forward(x)
        return -(standard_normal_log_prob(z) + logdet).mean()

    def logdet_estimate(self, x: Tensor) -> Tensor:
        """The library's training log-det estimate, per sample."""
        return self.forward(x)[1].detach()


# --- ours ---------------------------------------------------------------------------------------------
def ours(args: dict, activation: str, preactivation: bool, estimator: LogDetEstimator, method: str) -> Adapter:
    blocks = [
        InvertibleResidualBlock(
            mlp_branch(
                2,
                (args["width"],) * 3,
                spectral=SpectralConfig(coeff=args["coeff"], n_power_iterations=args["power_iterations"]),
                activation=activation,
                preactivation=preactivation,
            ),
            estimator=estimator,
            inverse_config=FixedPointConfig(atol=1e-6, rtol=1e-6, max_iterations=1000, method=method),
        )
        for _ in range(args["blocks"])
    ]
    flow = TransformSequence(*blocks)
    return Adapter(module=flow, forward=flow, forward_map=flow.map, invert=flow.inverse)


# --- FrEIA ----------------------------------------------------------------------------------------------
def freia(args: dict) -> Adapter:
    from FrEIA.modules import IResNetLayer

    layers: Any = nn.ModuleList(  # FrEIA's layers (untyped)
        IResNetLayer(
            [(2,)],
            internal_size=args["width"],
            n_internal_layers=2,  # 2 -> 64 -> 64 -> 64 -> 2
            jacobian_iterations=args["terms"],
            hutchinson_samples=1,
            fixed_point_iterations=50,
            spectral_norm_max=args["coeff"],
        )
        for _ in range(args["blocks"])
    )
    for layer in layers:
        layer.lipschitz_correction()

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in layers:
            (x,), jac = layer([x])
            logdet = logdet + jac
        return x, logdet

    def forward_map(x: Tensor) -> Tensor:
        for layer in layers:
            x = x + layer.residual(x)
        return x

    def invert(z: Tensor) -> Tensor:
        for layer in reversed(layers):
            (z,), _ = layer([z], rev=True, jac=False)
        return z

    def after_step() -> None:
        for layer in layers:
            layer.lipschitz_correction()

    return Adapter(
        module=layers,
        forward=forward,
        forward_map=forward_map,
        invert=invert,
        after_step=after_step,
        logdet_gradient=False,  # its VJPs are taken without create_graph
    )


# --- normflows ----------------------------------------------------------------------------------------
def normflows(args: dict, brute_force: bool) -> Adapter:
    import normflows as nf

    flows: Any = nn.ModuleList(  # normflows' flows (untyped)
        nf.flows.Residual(
            nf.nets.LipschitzMLP(
                [2] + [args["width"]] * 3 + [2],
                lipschitz_const=args["coeff"],
                max_lipschitz_iter=args["power_iterations"],
                init_zeros=False,  # the same (default) initialisation as the other rows
            ),
            reverse=False,  # forward(x) = x + g(x), the data -> latent direction
            reduce_memory=True,
            n_exact_terms=2,
            geom_p=0.5,
            brute_force=brute_force,
        )
        for _ in range(args["blocks"])
    )

    def after_step() -> None:  # the library's contract: its forward uses stored vectors, updated here
        nf.utils.update_lipschitz(flows, args["power_iterations"])

    after_step()

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for flow in flows:
            x, ld = flow(x)
            logdet = logdet + ld
        return x, logdet

    def forward_map(x: Tensor) -> Tensor:
        for flow in flows:
            x = x + flow.iresblock.nnet(x)
        return x

    def invert(z: Tensor) -> Tensor:
        for flow in reversed(flows):
            z, _ = flow.inverse(z)
        return z

    return Adapter(
        module=flows,
        forward=forward,
        forward_map=forward_map,
        invert=invert,
        after_step=after_step,
    )


# (row name, builder); the peer rows come right after the row of ours they are paired with
ROWS: list[tuple[str, Callable[[dict], Adapter]]] = [
    ("ours: ELU, exact", lambda a: ours(a, "elu", False, ExactLogDet(), "plain")),
    (
        "ours: ELU, series (Neumann)",
        lambda a: ours(
            a, "elu", False, PowerSeriesLogDet(n_terms=a["terms"], probe="rademacher", gradient="neumann"), "anderson"
        ),
    ),
    ("FrEIA IResNetLayer: ELU, series", freia),
    (
        "ours: LipSwish, roulette (Neumann)",
        lambda a: ours(a, "lipswish", True, RussianRouletteLogDet(n_exact_terms=2, gradient="neumann"), "anderson"),
    ),
    ("normflows Residual: LipSwish, roulette", lambda a: normflows(a, brute_force=False)),
    ("ours: LipSwish, exact", lambda a: ours(a, "lipswish", True, ExactLogDet(), "plain")),
    ("normflows Residual: LipSwish, exact", lambda a: normflows(a, brute_force=True)),
]


def _build(index: int, args: dict, device: torch.device) -> tuple[Adapter, torch.optim.Optimizer]:
    torch.manual_seed(args["seed"])
    adapter = ROWS[index][1](args)
    adapter.module.to(device).train()
    return adapter, torch.optim.Adam(adapter.module.parameters(), lr=args["lr"])


def _train_step(adapter: Adapter, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    adapter.loss(x).backward()
    optimizer.step()
    adapter.after_step()


def _clock(device: torch.device, threads: int) -> tuple[Callable[[], float], str]:
    """CPU time for one CPU thread (immune to other processes' load), else wall time (CUDA synchronised)."""
    if device.type == "cpu" and threads == 1:
        return time.process_time, "process CPU time"
    if device.type == "cuda":

        def synchronised() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return synchronised, "wall time"
    return time.perf_counter, "wall time"


def _time_interleaved(indices: list[int], args: dict, queue) -> None:
    """Every row's training steps taken in turn in this one process: drift on the machine hits them alike."""
    try:
        if args.get("threads"):
            torch.set_num_threads(args["threads"])
        device = resolve_device(args["device"])
        clock, clock_name = _clock(device, torch.get_num_threads())
        rows = [_build(index, args, device) for index in indices]
        times: list[list[float]] = [[] for _ in rows]
        for step in range(args["steps"]):
            x = sample_toy(args["dataset"], args["batch"], seed=step).to(device)
            for (adapter, optimizer), row_times in zip(rows, times, strict=True):
                start = clock()
                _train_step(adapter, optimizer, x)
                row_times.append(clock() - start)
        queue.put({"seconds_per_step": [statistics.median(t[args["warmup"] :]) for t in times], "clock": clock_name})
    except Exception as exc:
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _measure(index: int, args: dict, queue) -> None:
    """One row alone in this process: memory, accuracy of its estimator and of its inverse."""
    name = ROWS[index][0]
    try:
        if args.get("threads"):
            torch.set_num_threads(args["threads"])
        device = resolve_device(args["device"])
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        adapter, optimizer = _build(index, args, device)
        test = sample_toy(args["dataset"], args["n_test"], seed=10_000).to(device)
        base = memory_now_mib(device)
        for step in range(args["steps"]):
            _train_step(adapter, optimizer, sample_toy(args["dataset"], args["batch"], seed=step).to(device))
        peak = memory_peak_mib(device)
        # accuracy of the training estimator against the exact log-det of the same map
        estimate = adapter.logdet_estimate(test.clone()).detach()  # a copy: normflows sets requires_grad on it
        adapter.module.eval()
        log_prob, exact = exact_log_prob(adapter.forward_map, test)
        error = estimate - exact
        # the library's own inverse of the test latents
        with torch.no_grad():
            z = adapter.forward_map(test)
            sync()
            start = time.perf_counter()
            x_rec = adapter.invert(z).detach()  # normflows' inverse re-enables grad inside
            sync()
            inverse_seconds = time.perf_counter() - start
        queue.put(
            {
                "row": name,
                "memory_above_start_mib": peak - base,
                "test_nll": float(-log_prob.mean()),
                "logdet_mean_error": float(error.mean()),
                "logdet_mean_abs_error": float(error.abs().mean()),
                "inverse_max_abs_error": float((x_rec - test).abs().max()),
                "inverse_seconds": inverse_seconds,
                "logdet_gradient": adapter.logdet_gradient,
                "device": str(device),
            }
        )
    except Exception as exc:
        queue.put({"row": name, "error": f"{type(exc).__name__}: {exc}"})


def run(args: dict) -> list[dict]:
    """Each selected row alone in its own process (memory, accuracy); then ``--repeats`` runs timing all of them
    interleaved in one process (:func:`_time_interleaved`); per row the median step time over the runs."""
    indices = [
        index
        for index, (name, _) in enumerate(ROWS)
        if not args.get("rows") or any(part in name for part in args["rows"])
    ]
    results = []
    for index in indices:
        result = in_fresh_process(_measure, index, args)
        log.info("%s: %s", ROWS[index][0], result.get("error") or "measured")
        results.append(result)
    rounds = []
    for repeat in range(args["repeats"]):
        timing = in_fresh_process(_time_interleaved, indices, args)
        if "error" in timing:
            raise RuntimeError(f"the interleaved timing run failed: {timing['error']}")
        log.info(
            "timing run %d/%d (%s): %s", repeat + 1, args["repeats"], timing["clock"],
            ", ".join(f"{s * 1e3:.1f}" for s in timing["seconds_per_step"]),
        )  # fmt: skip
        rounds.append(timing)
    for position, result in enumerate(results):
        if "error" not in result:
            per_round = [r["seconds_per_step"][position] for r in rounds]
            result["seconds_per_step"] = statistics.median(per_round)
            result["seconds_per_step_rounds"] = per_round
            result["clock"] = rounds[0]["clock"]
    return results


def format_table(results: list[dict]) -> str:
    """The rows as a markdown table (the printout and docs/benchmarks.md), with the clock the step times are."""
    header = ("row", "CPU ms/step", "+MiB", "test NLL", "log-det error (mean / mean abs)", "inverse max error / ms",
              "log-det in the gradient")  # fmt: skip
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["row"], f"failed: {r['error']}", "", "", "", "", ""))
            continue
        rows.append(
            (
                r["row"],
                f"{r['seconds_per_step'] * 1e3:.1f}",
                f"{r['memory_above_start_mib']:.0f}",
                f"{r['test_nll']:.3f}",
                f"{r['logdet_mean_error']:.3f} / {r['logdet_mean_abs_error']:.3f}",
                f"{r['inverse_max_abs_error']:.1e} / {r['inverse_seconds'] * 1e3:.0f}",
                "yes" if r["logdet_gradient"] else "**no**",
            )
        )
    clocks = sorted({r["clock"] for r in results if "clock" in r})
    note = f"\nCPU ms/step: the median step, every row's steps in turn in one process ({', '.join(clocks)}).\n"
    return markdown_table(header, rows) + (note if clocks else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="8gaussians")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--coeff", type=float, default=0.9)
    parser.add_argument("--power-iterations", type=int, default=5)
    parser.add_argument("--terms", type=int, default=20, help="series terms of the truncated estimators")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median time")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved timing runs over all rows; the step time is their median"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads of each process (0: torch's default); with 1 on CPU the step time is process CPU time",
    )  # fmt: skip
    parser.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these (e.g. exact)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = vars(parser.parse_args(argv))
    if not 0 < args["coeff"] < 1:
        parser.error("--coeff must satisfy 0 < c < 1")
    if args["repeats"] < 1:
        parser.error("--repeats must be >= 1")
    if args["steps"] <= args["warmup"]:
        parser.error("--steps must exceed --warmup")
    setup_logging()
    results = run(args)
    emit(format_table(results), args["json"], {"config": args, "results": results})


if __name__ == "__main__":
    main()
