"""The main job as a benchmark: the README's first command, timed, its result recorded as data.

    python -m benchmarks.main_job                   # runs `mlflow run . -e density` in a new store, records it
    python -m benchmarks.main_job --from-run RUN_ID # records a density run already tracked (MLFLOW_TRACKING_URI)

Writes ``benchmarks/results/main-job.json``: the run's state, its test bits/dim with the standard error, the wall
time of the run (its MLflow start to end), its processes' CPU seconds and the share evaluation took, with the
machine and commit it ran on. The README's headline table is rendered from it (:mod:`benchmarks.render`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from benchmarks.results_data import provenance, write_result
from experiments.tracking import metric_value

log = logging.getLogger("benchmarks.main_job")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["mlflow", "run", ".", "-e", "density", "--env-manager", "local"]
RESULT_NAME = "main-job"


def record(run_id: str) -> dict[str, Any]:
    """The result of density run ``run_id`` (the active tracking store's)."""
    run = mlflow.MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    figures = {
        "status": run.info.status,
        "preset": run.data.params.get("preset"),
        "dataset": run.data.params.get("dataset"),
        "epochs": int(run.data.params.get("epochs", 0)),
        "wall_seconds": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "test_bpd": metric_value(metrics, "test/bpd"),
        "test_standard_error_bpd": metric_value(metrics, "test/standard_error_bpd"),
        "process_cpu_seconds": metric_value(metrics, "eval/process_cpu_seconds"),
        "eval_cpu_fraction": metric_value(metrics, "eval/cpu_fraction"),
        "converged": bool(metric_value(metrics, "test/converged")),
        "unbiased": bool(metric_value(metrics, "test/unbiased")),
    }
    commit = run.data.tags.get("mlflow.source.git.commit")
    return {
        "benchmark": "main_job",
        "command": " ".join(COMMAND),
        "run_id": run_id,
        "figures": figures,
        "commit": commit,
    }


def run_main_job(store: Path) -> str:
    """Run the README's first command into a new store under ``store``; returns the run id."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    command = [*COMMAND, "-P", f"checkpoint_dir={store / 'checkpoints'}"]
    subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=True)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-run", help="record this tracked density run instead of running the job")
    parser.add_argument("--output-dir", type=Path, default=None, help="where main-job.json goes (benchmarks/results)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # the new store lives while the run is recorded
        run_id = args.from_run or run_main_job(Path(tmp))
        result = record(run_id)
    if result["figures"]["status"] != "FINISHED":
        log.error("run %s is %s, not FINISHED: not recorded", run_id, result["figures"]["status"])
        return 1
    # the machine is this one (record a run on the machine that ran it); the commit is the run's own
    machine = provenance()
    result["provenance"] = machine | {"commit": result.pop("commit") or machine["commit"]}
    path = write_result(RESULT_NAME, result, *([args.output_dir] if args.output_dir else []))
    log.info("%s: %s", path, result["figures"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
