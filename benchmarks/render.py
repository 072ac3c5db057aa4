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
    ]
    lines = ["| what | measured |", "|---|---|", *(f"| {what} | {figure} |" for what, figure in rows)]
    return "\n".join(lines) + "\n"


QUALITY_STANDING = (  # the result files of the current comparison: each a final of 3 seeds at one budget
    "quality-digits-mnist5k-retest",
    "quality-digits-mnist5k-2x-retest",
    "quality-fashion-mnist-retest",
)


def quality_standing() -> str:
    """docs/benchmarks.md's standing: this flow against the best tuned peer, per dataset and budget."""
    lines = [
        "| data | training CPU-s | seeds | this flow | best peer | peer ahead by (paired) | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in QUALITY_STANDING:
        result = read_result(name)
        for ours, peer, budget in _finals(result):
            lines.append(
                f"| {result['config']['dataset']} | {budget:g} ({ours['multiple']:g}x) | {len(ours['seeds'])} | "
                f"{ours['mean']:.3f} ± {ours['sd']:.3f} | {ours['best_peer']} {peer['mean']:.3f} ± {peer['sd']:.3f} | "
                f"{ours['difference_mean']:.3f} ± {ours['difference_sd']:.3f} | `{name}.json` |"
            )
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {"headline": headline, "quality-standing": quality_standing}


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
