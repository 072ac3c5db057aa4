"""``mlflow run . -e reproduce``: run the training a scale needs, then ``report``.

    python -m analysis.reproduce --scale smoke      # about a minute: every entry point on tiny data
    python -m analysis.reproduce --scale quick      # the CPU presets (about 30 minutes on 2 cores)
    python -m analysis.reproduce --scale paper --data-dir ~/data --device cuda     # GPUs, days

Each scale is a list of (entry point, preset, overrides): data, not code.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from analysis import report
from experiments import classify, density, toy
from experiments.entry_point import EntryPoint
from experiments.tracking import ENTRY_POINT_TAG, orchestrator_run, set_description
from experiments.tracking_store import PROJECT_ROOT
from pipeline.fields import documented

log = logging.getLogger("analysis.reproduce")

ENTRY_POINTS = {"density": density, "classify": classify, "toy": toy}

_SMOKE_DENSITY = dict(
    dataset="digits8x8",
    n_blocks=(1, 1),
    hidden_channels=(8,),
    n_terms=2,
    epochs=1,
    batch_size=256,
    eval_max_images=60,
    se_tol=0.05,
    max_passes=3,
    n_samples=8,
)
_SMOKE_CLASSIFY = dict(
    dataset="digits8x8",
    n_blocks=(1, 1),
    hidden_channels=(8, 8),
    strides=(1, 2),
    injective_padding=1,
    epochs=1,
    batch_size=256,
    milestones=(),
    recon_images=4,
    recon_iterations=(1, 5, 20),
)
_SMOKE_TOY = dict(
    steps=40, steps_per_epoch=20, n_test=300, grid_size=60, n_samples=200, dynamics_depth=4, dynamics_steps=30
)

SCALES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "smoke": [
        ("density", "quick", _SMOKE_DENSITY),
        ("classify", "quick", {**_SMOKE_CLASSIFY, "model": "iresnet", "coeff": 0.9}),
        ("classify", "quick", {**_SMOKE_CLASSIFY, "model": "iresnet", "coeff": 0.5}),
        ("classify", "quick", {**_SMOKE_CLASSIFY, "model": "resnet"}),
        ("toy", "quick", _SMOKE_TOY),
    ],
    "quick": [
        ("density", "quick", {}),
        *[("classify", "quick", {"model": "iresnet", "coeff": c}) for c in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)],
        ("classify", "quick", {"model": "resnet"}),
        ("classify", "quick", {"model": "resnet-bn"}),
        ("toy", "quick", {}),
    ],
    "paper": [
        ("density", "paper-mnist", {}),
        ("density", "paper-cifar10", {}),
        *[
            ("classify", preset, {"model": "iresnet", "coeff": c})
            for preset in ("paper-mnist", "paper-cifar10", "paper-cifar100")
            for c in (0.5, 0.6, 0.7, 0.8, 0.9)
        ],
        *[
            ("classify", preset, {"model": m})
            for preset in ("paper-mnist", "paper-cifar10", "paper-cifar100")
            for m in ("resnet", "resnet-bn")
        ],
        ("toy", "paper", {}),
    ],
}


@dataclass(frozen=True)
class ReproduceConfig:
    scale: str = documented("quick", "what to train: smoke (a minute), quick (the CPU presets) or paper (GPUs, days)")
    data_dir: str | None = documented(None, "folder of the paper scale's datasets (mnist, cifar10, cifar100)")
    download: bool = documented(False, "download missing datasets into data_dir")
    device: str = documented("auto", "auto (a GPU if there is one), cpu, cuda or cuda:N")
    tag: str = documented("reproduce", "prefix of the run names; the report reads exactly the runs made here")
    output_dir: str = documented(str(PROJECT_ROOT / "outputs" / "reproduce"), "folder of the report's files")
    checkpoint_dir: str = documented(str(PROJECT_ROOT / "checkpoints"), "folder of the runs' checkpoints")
    progress: bool = documented(True, "progress bars on the console")

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {sorted(SCALES)}")
        for entry, preset, overrides in SCALES[self.scale]:  # validate every configuration up front
            self.entry_config(entry, preset, overrides)

    def entry_config(self, entry: str, preset: str, overrides: dict[str, Any]) -> Any:
        module = ENTRY_POINTS[entry]
        fields = module.PRESETS[preset] | overrides
        extra: dict[str, Any] = {
            "device": self.device,
            "checkpoint_dir": self.checkpoint_dir,
            "progress": self.progress,
            "run_name": f"{self.tag}-{entry}",
        }
        if entry != "toy" and fields.get("dataset", "") not in ("digits-mnist5k", "digits8x8"):
            extra |= {"data_dir": self.data_dir, "download": self.download}
        return module.config_from_preset(preset, **overrides, **extra)


def run(cfg: ReproduceConfig) -> str:
    """Train what the scale lists, then build the report; returns the orchestrator's run id.

    The orchestrator's run (under ``mlflow run``: the launched run, claimed before any training
    starts) lists the runs it made (``runs.json``, and a ``run.NN.<entry>`` tag each) and links the
    report (``report_run_id``). Every training is a run of its own in its entry point's experiment,
    tagged ``reproduce_run_id``: not a nested child, because nesting keeps a child in its parent's
    experiment, where ``report`` and the MLflow UI's per-experiment views would not find it. The
    report reads exactly these runs. A table the scale promised that comes out empty fails the run.
    """
    client = MlflowClient()
    tags = {ENTRY_POINT_TAG: "reproduce", "reproduce_scale": cfg.scale}
    with orchestrator_run("reproduce", run_name=f"{cfg.tag}-{cfg.scale}", tags=tags) as run_id:
        set_description(run_id, f"Reproducing the paper at scale {cfg.scale}: {len(SCALES[cfg.scale])} trainings ...")
        made = []
        for i, (entry, preset, overrides) in enumerate(SCALES[cfg.scale]):
            log.info("reproduce (%s): %s, preset %s %s", cfg.scale, entry, preset, overrides or "")
            child = ENTRY_POINTS[entry].run(cfg.entry_config(entry, preset, overrides))
            client.set_tag(child, "reproduce_run_id", run_id)
            client.set_tag(run_id, f"run.{i:02d}.{entry}", child)
            made.append({"entry": entry, "preset": preset, "overrides": overrides, "run_id": child})
            client.log_text(run_id, json.dumps(made, indent=2, default=str), "runs.json")
        report_id = report.run(
            report.ReportConfig(
                filter_string=f"tags.reproduce_run_id = '{run_id}'",
                output_dir=cfg.output_dir,
                run_name=f"{cfg.tag}-report",
            )
        )
        client.set_tag(run_id, "report_run_id", report_id)
        metrics = client.get_run(report_id).data.metrics
        promised = {"Table 2": ("classify", "tables/table2_rows"), "Table 4": ("density", "tables/table4_rows")}
        empty = [
            name
            for name, (entry, metric) in promised.items()
            if any(e == entry for e, _, _ in SCALES[cfg.scale]) and not metrics.get(metric)
        ]
        if empty:
            raise RuntimeError(f"{' and '.join(empty)} came out empty; see report run {report_id} for the runs' states")
        set_description(
            run_id,
            f"Scale {cfg.scale}: {len(made)} trainings, then report run {report_id} "
            f"({cfg.output_dir}/report.md): {client.get_run(report_id).data.tags.get('mlflow.note.content', '')}",
        )
    return run_id


ENTRY = EntryPoint(ReproduceConfig, None, run, __doc__)  # no presets: the fields are the configuration
main = ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
