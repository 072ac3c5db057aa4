"""The README's and the docs' tables of measured figures, rendered from the result files in ``benchmarks/results``.

    python -m benchmarks.render           # rewrite every rendered table in place
    python -m benchmarks.render --check   # exit 1 (naming the tables) where a committed table differs

A rendered table sits between ``<!-- rendered: NAME -->`` and ``<!-- /rendered -->`` in a markdown file; NAME is
one of :data:`TABLES`, a function of the result files. A figure with no result file behind it has no place here.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.results_data import RESULTS_DIR, read_result
from benchmarks.tables import markdown_table

log = logging.getLogger("benchmarks.render")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RENDERED_FILES = ("README.md", "docs/benchmarks.md")
MARKER = re.compile(r"(<!-- rendered: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /rendered -->)", re.DOTALL)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _finals(result: dict) -> list[tuple[dict, dict, float]]:
    """A quality result's finals: per budget, this flow's summary, its best peer's and the training CPU-s."""
    summary = {(s["contender"], s["multiple"]): s for s in result["summary"]}
    finals = []
    for (contender, multiple), ours in summary.items():
        if contender == "iresnet":
            budget = next(r["budget_s"] for r in result["results"] if r["multiple"] == multiple)
            finals.append((ours, summary[(ours["best_peer"], multiple)], budget))
    return finals


def _quality_row(name: str) -> tuple[str, str]:
    """A quality benchmark's final at the 1x budget: this flow against the best peer."""
    result = read_result(name)
    ours, peer, budget = next(final for final in _finals(result) if final[0]["multiple"] == 1.0)
    seeds = len(ours["seeds"])
    what = (
        f"test bits/dim, {result['config']['dataset']}, {budget:g} CPU-s of training each, every flow tuned alike on "
        f"validation, {seeds} seeds (`benchmarks.quality`, `{name}.json`)"
    )
    figure = (
        f"this flow {ours['mean']:.3f} ± {ours['sd']:.3f}, {ours['best_peer']} {peer['mean']:.3f} ± {peer['sd']:.3f}: "
        f"{ours['best_peer']} ahead by {ours['difference_mean']:.3f} ± {ours['difference_sd']:.3f}"
    )
    return what, figure


def _step_time_row() -> tuple[str, str]:
    """The training step's cost ratios, each measured within one run of ``benchmarks.step_time``."""
    result = read_result("step-time")
    ratio = {t["ratio"]: t["value"] for t in result["targets"]}
    config = result["config"]
    what = (
        f"training step, {'×'.join(map(str, config['image']))} images, batch {config['batch']} "
        f"(`benchmarks.step_time`, `step-time.json`)"
    )
    figure = (
        f"i-ResNet classifier {ratio['i-ResNet / ResNet classifier step']:.2f}× a vanilla ResNet's; 5-term flow "
        f"(Neumann) {ratio['5-term flow (Neumann) / classifier step']:.2f}× the classifier's, with "
        f"{ratio['memory, Neumann / backprop (5 terms)']:.2f}× backprop's memory growth"
    )
    return what, figure


PEER_PAIRS = (  # (ours, theirs, what both use): rows of equal accuracy
    ("ours: LipSwish, roulette (Neumann)", "normflows Residual: LipSwish, roulette", "the unbiased roulette"),
    ("ours: LipSwish, exact", "normflows Residual: LipSwish, exact", "the exact log-det"),
)


def _peers_row() -> tuple[str, str]:
    """This library's step against normflows' on the same 2-D flow, CPU time at equal NLL."""
    rows = {r["row"]: r for r in read_result("peers")["results"]}
    what = "the same 2-D residual flow as normflows' (Residual Flows' code), CPU per step (`benchmarks.peers`)"
    parts = []
    for ours, theirs, both in PEER_PAIRS:
        a, b = rows[ours], rows[theirs]
        parts.append(
            f"{a['seconds_per_step'] / b['seconds_per_step']:.2f}× normflows' with {both} "
            f"(NLL {a['test_nll']:.3f} against {b['test_nll']:.3f})"
        )
    return what, "; ".join(parts)


def headline() -> str:
    """The README's headline table."""
    job = read_result("main-job")
    figures, machine = job["figures"], job["provenance"]
    rows = [
        (
            f"the main job (`{job['command']}`), {machine['cpu_cores']} cores of an {machine['cpu_model']}",
            f"{figures['status']}, test {figures['test_bpd']:.3f} ± {figures['test_standard_error_bpd']:.4f} bits/dim "
            f"in {_duration(figures['wall_seconds'])} ({figures['process_cpu_seconds']:.0f} CPU-s, evaluation "
            f"{figures['eval_cpu_fraction']:.1%} of it)",
        ),
        _quality_row("quality-digits-mnist5k-retest"),
        _quality_row("quality-fashion-mnist-retest"),
        _step_time_row(),
        _peers_row(),
    ]
    return markdown_table(("what", "measured"), rows)


QUALITY_STANDING = (  # the result files of the current comparison: each a final of 3 seeds at one budget
    "quality-digits-mnist5k-retest",
    "quality-digits-mnist5k-2x-retest",
    "quality-fashion-mnist-retest",
)


def _measured_on(*names: str) -> str:
    """The line under a table: where its result files were measured, and which files they are."""
    machines = []
    for name in names:
        machine = read_result(name).get("provenance")
        if machine is None:
            described = "a machine the result does not record (written before results carried their provenance)"
        else:
            where = (
                machine["device"]
                if machine["device"] != "cpu"
                else f"{machine['cpu_cores']} cores of an {machine['cpu_model']}"
            )
            sha, _, dirty = machine["commit"].partition("+")
            changes = " with local changes" if dirty else ""
            described = f"{where}, torch {machine['torch']}, commit {sha[:10]}{changes}"
        if described not in machines:
            machines.append(described)
    files = ", ".join(f"`{name}.json`" for name in names)
    return f"\nMeasured on {'; '.join(machines)} ({files}).\n"


def step_time() -> str:
    """``benchmarks.step_time``: seconds per training step and memory growth of each case, ratios to case (a)."""
    from benchmarks import step_time as benchmark

    return benchmark.case_table(read_result("step-time")["results"]) + _measured_on("step-time")


def step_time_ratios() -> str:
    """``benchmarks.step_time``'s ratios, each from one run's own measurements, against their targets."""
    from benchmarks import step_time as benchmark

    return benchmark.ratio_table(read_result("step-time")["targets"])


INVERSE = {"flow": "inverse-flow", "worst case": "inverse-worst-case"}


def inverse() -> str:
    """``benchmarks.inverse``: g evaluations and seconds to invert to the target error, plain vs Anderson."""
    from benchmarks import inverse as benchmark

    rows = {model: read_result(name)["results"] for model, name in INVERSE.items()}
    return benchmark.markdown(rows) + _measured_on(*INVERSE.values())


def peers() -> str:
    """``benchmarks.peers``: this library against normflows and FrEIA on the same 2-D flow."""
    from benchmarks import peers as benchmark

    return benchmark.format_table(read_result("peers")["results"]) + _measured_on("peers")


BUDGET_CURVE = "quality-digits-mnist5k-pilots-2026-12-06"  # the flows at 1x, 2x, 4x, 8x (validation, seed 0)


def budget_points() -> dict[str, list[tuple[float, float, int]]]:
    """Per flow, ``(training CPU-s, validation bits/dim, steps)`` at each budget of the budget-curve pilots."""
    points: dict[str, list[tuple[float, float, int]]] = {}
    for pilot in read_result(BUDGET_CURVE)["pilots"]:
        if not (pilot["name"].startswith("base") or pilot["name"].startswith("glow")) or pilot["name"] == "base_b":
            continue
        for r in pilot["results"]:
            points.setdefault(r["contender"], []).append((r["budget_s"], r["validation"]["bpd"], r["steps"]))
    return {flow: sorted(p) for flow, p in points.items()}


def quality_budget() -> str:
    """The budget curve as a table: each tuned flow's validation bits/dim at 1x to 8x of the training CPU."""
    points = budget_points()
    ours, glow = ({b: (bpd, steps) for b, bpd, steps in points[name]} for name in ("iresnet", "glow"))
    base = min(ours)
    rows = [
        (
            f"{budget / base:g}× ({budget:g})",
            f"{ours[budget][0]:.3f} ({ours[budget][1]:,} steps)",
            f"{glow[budget][0]:.3f} ({glow[budget][1]:,} steps)",
            f"{ours[budget][0] - glow[budget][0]:+.3f}",
        )
        for budget in sorted(ours)
        if budget in glow
    ]
    header = ("budget (training CPU-s)", "this flow, validation bits/dim", "Glow", "difference")
    return markdown_table(header, rows) + _measured_on(BUDGET_CURVE)


def plot_budget_curve(path: Path) -> None:
    """The budget curve as a PNG: validation bits/dim against training CPU-seconds, one line per tuned flow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for flow, label in (("iresnet", "this flow (i-ResNet)"), ("glow", "Glow (normflows)")):
        budgets, bpds, _ = zip(*budget_points()[flow], strict=True)
        ax.plot(budgets, bpds, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("training CPU-seconds (one thread)")
    ax.set_ylabel("validation bits/dim")
    ax.set_title("digits-mnist5k, each flow at its tuned settings")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


FIGURES: dict[str, Callable[[Path], None]] = {"docs/figures/benchmarks/budget-curve.png": plot_budget_curve}


def quality_standing() -> str:
    """docs/benchmarks.md's standing: this flow against the best tuned peer, per dataset and budget."""
    rows = [
        (
            result["config"]["dataset"],
            f"{budget:g} ({ours['multiple']:g}x)",
            len(ours["seeds"]),
            f"{ours['mean']:.3f} ± {ours['sd']:.3f}",
            f"{ours['best_peer']} {peer['mean']:.3f} ± {peer['sd']:.3f}",
            f"{ours['difference_mean']:.3f} ± {ours['difference_sd']:.3f}",
            f"`{name}.json`",
        )
        for name in QUALITY_STANDING
        for result in [read_result(name)]
        for ours, peer, budget in _finals(result)
    ]
    header = ("data", "training CPU-s", "seeds", "this flow", "best peer", "peer ahead by (paired)", "result")
    return markdown_table(header, rows)


TABLES: dict[str, Callable[[], str]] = {
    "headline": headline,
    "quality-standing": quality_standing,
    "quality-budget": quality_budget,
    "step-time": step_time,
    "step-time-ratios": step_time_ratios,
    "inverse": inverse,
    "peers": peers,
}


def render_text(text: str, source: str = "") -> str:
    """``text`` with every rendered table replaced by its rendering now."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise ValueError(f"{source}: unknown rendered table {name!r}; known: {sorted(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)

    return MARKER.sub(replace, text)


def stale_tables(root: Path = PROJECT_ROOT) -> list[str]:
    """The rendered tables whose committed text differs from their rendering (``file: name``)."""
    stale = []
    for relative in RENDERED_FILES:
        path = root / relative
        text = path.read_text()
        for match in MARKER.finditer(text):
            rendered = render_text(match.group(0), relative)
            if rendered != match.group(0):
                stale.append(f"{relative}: {match['name']}")
    return stale


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 where a committed table differs; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_tables()
        for entry in stale:
            log.error("%s differs from its rendering from %s: run python -m benchmarks.render", entry, RESULTS_DIR)
        return 1 if stale else 0
    for relative in RENDERED_FILES:
        path = PROJECT_ROOT / relative
        text = path.read_text()
        rendered = render_text(text, relative)
        if rendered != text:
            path.write_text(rendered)
            log.info("rendered %s", relative)
    for relative, plot in FIGURES.items():
        plot(PROJECT_ROOT / relative)
        log.info("drew %s", relative)
    return 0


if __name__ == "__main__":
    sys.exit(main())
