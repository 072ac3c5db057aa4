"""``mlflow run . -e report``: the paper's tables and figures from runs already tracked.

    python -m analysis.report                                   # every experiment, into outputs/report
    python -m analysis.report --filter-string "params.preset = 'paper-cifar10'" --output-dir outputs/cifar
    python -m analysis.report --experiments Default,density     # only these experiments

Runs are found by what they are (their ``entry_point`` tag, :mod:`analysis.tables`), in whichever experiment
they were logged to. Writes CSV tables (each beside the paper's numbers where a row follows the paper's
protocol, with run IDs), PNG and PDF figures, and ``report.md`` showing them all, an empty table with the reason;
everything is also logged to an MLflow run in experiment ``analysis``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from analysis.tables import config, config_int, empty_reason, finished_runs, table2, table4, tracked_runs
from experiments.classify_artifacts import RECONSTRUCTION_CURVE
from experiments.config import log_configuration
from experiments.entry_point import EntryPoint
from experiments.metric_logging import log_metrics
from experiments.models import load_model, require_kind
from experiments.tracking import ENTRY_POINT_TAG, set_description, tracked_run
from experiments.tracking_store import PROJECT_ROOT, configure_tracking
from pipeline.data import dequantize, load_dataset, pad_images
from pipeline.diagnostics import logdet_estimator_study
from pipeline.fields import documented
from pipeline.plotting import new_figure

log = logging.getLogger("analysis.report")


@dataclass(frozen=True)
class ReportConfig:
    experiments: str = documented("", "comma-separated MLflow experiments to read runs from; '': every experiment")
    filter_string: str = documented(
        "", "an MLflow search filter every run must match, e.g. \"params.preset = 'paper-cifar10'\""
    )
    output_dir: str = documented(str(PROJECT_ROOT / "outputs" / "report"), "folder of report.md, the CSVs, figures")
    estimator_images: int = documented(4, "test images of the log-det estimator study (Figs. 4/9, >= 1)")
    estimator_terms: tuple[int, ...] = documented((1, 2, 3, 5, 10, 20), "power-series terms the study compares")
    estimator_probes: int = documented(64, "Hutchinson probes per image in the study (>= 2)")
    estimator_model: str = documented(
        "", "the study's density model: a run id, runs:/ or models:/ URI; '': the latest density run's"
    )
    experiment_name: str = documented("analysis", "MLflow experiment of the report's own run")
    run_name: str | None = documented(None, "MLflow name of the report's run; unset: report")
    progress: bool = documented(False, "progress bars on the console")

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimator_terms", tuple(self.estimator_terms))
        if self.estimator_images < 1 or self.estimator_probes < 2 or not self.estimator_terms:
            raise ValueError("estimator_images >= 1, estimator_probes >= 2 and some estimator_terms are needed")

    @property
    def experiment_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.experiments.split(",") if name.strip())


def _save(fig, out: Path, name: str) -> list[str]:
    fig.tight_layout()
    files = []
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{name}.{ext}", dpi=120)
        files.append(f"{name}.{ext}")
    plt.close(fig)
    return files


def _copy_artifact(run_id: str, artifact: str, out: Path, name: str) -> str | None:
    available = {a.path for a in MlflowClient().list_artifacts(run_id)}
    if artifact not in available:
        return None
    local = MlflowClient().download_artifacts(run_id, artifact)
    shutil.copy(local, out / name)
    if name.endswith(".png"):  # every figure also as PDF
        fig = plt.figure(figsize=(8, 8))
        fig.figimage(plt.imread(out / name), resize=True)
        fig.savefig(out / f"{name.removesuffix('.png')}.pdf")
        plt.close(fig)
    return name


def _markdown_table(df: pd.DataFrame, reason: str = "") -> str:
    if df.empty:
        return f"_empty: {reason or 'no finished runs'}_\n"
    cells = df.astype(object).where(df.notna(), "")
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in cells.itertuples(index=False)
    ]
    return "\n".join([header, sep, *body]) + "\n"


class Report:
    """Collects sections (text, tables, figures) and writes ``report.md``."""

    def __init__(self, out: Path) -> None:
        self.out, self.lines = out, ["# i-ResNet: reproduced tables and figures", ""]

    def table(self, title: str, df: pd.DataFrame, csv_name: str, reason: str = "") -> None:
        """A table; where it is empty, ``reason`` says why (:func:`analysis.tables.empty_reason`)."""
        df.to_csv(self.out / csv_name, index=False)
        self.lines += [f"## {title}", "", f"CSV: `{csv_name}`", "", _markdown_table(df, reason)]
        if df.empty:
            log.warning("%s is empty: %s", title, reason or "no finished runs")

    def figure(self, title: str, files: list[str], note: str = "") -> None:
        if not files:
            return
        self.lines += [f"### {title}", ""] + ([note, ""] if note else [])
        self.lines += [f"![{title}]({f})" for f in files if f.endswith(".png")] + [""]

    def write(self) -> Path:
        path = self.out / "report.md"
        path.write_text("\n".join(self.lines))
        return path


def _classify_figures(t2: pd.DataFrame, runs: pd.DataFrame, report: Report, out: Path) -> None:
    client = MlflowClient()
    if t2.empty:
        return
    fig, ax = new_figure()
    for dataset, group in t2.groupby("dataset"):
        inv = group[group["model"] == "iresnet"].copy()
        inv["c"] = inv["column"].str.removeprefix("c=").astype(float)
        ax.plot(inv["c"], inv["test_error"], marker="o", linestyle="-", label=f"{dataset}: i-ResNet")
        for _, row in group[group["model"] != "iresnet"].iterrows():
            ax.axhline(row["test_error"], linestyle="--", linewidth=0.8, label=f"{dataset}: {row['column']}")
    ax.set_xlabel("Lipschitz coefficient c")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=7)
    report.figure("Table 2 as a figure: test error vs c", _save(fig, out, "table2_error_vs_coeff"))

    fig6, ax6 = new_figure(7, 4)
    fig8, ax8 = new_figure()
    for _, r in runs.iterrows():
        model = config(r, "model")
        label = f"{model}" + (f" c={config(r, 'coeff')}" if model == "iresnet" else "")
        label += f" ({r['run_id'][:8]})"
        if "layer_spectral_norms.csv" in {a.path for a in client.list_artifacts(r["run_id"])}:
            norms = pd.read_csv(client.download_artifacts(r["run_id"], "layer_spectral_norms.csv"))
            ax6.plot(range(len(norms)), norms["norm"], marker=".", linestyle="none", label=label)
        curve = _reconstruction_curve(r["run_id"])
        if curve:
            ax8.semilogy([k for k, _ in curve], [max(e, 1e-16) for _, e in curve], marker="o", label=label)
        name = _copy_artifact(r["run_id"], "reconstructions.png", out, f"fig3_reconstructions_{r['run_id'][:8]}.png")
        report.figure(f"Figs. 3/7: reconstructions, {label}", [name] if name else [], "top: originals; bottom: inverse")
    ax6.axhline(1.0, color="k", linewidth=0.8)
    ax6.set_xlabel("layer")
    ax6.set_ylabel("largest singular value (certified)")
    ax6.legend(fontsize=7)
    report.figure("Fig. 6: largest singular value of each layer", _save(fig6, out, "fig6_layer_norms"))
    ax8.set_xlabel("fixed-point iterations per block")
    ax8.set_ylabel("relative reconstruction error")
    ax8.legend(fontsize=7)
    report.figure("Fig. 8: reconstruction error vs iterations", _save(fig8, out, "fig8_recon_vs_iterations"))


def _reconstruction_curve(run_id: str) -> list[tuple[int, float]]:
    """Fig. 8's points of a classify run: (iterations, mean relative error), from its CSV artifact or, for a run of
    an earlier release, its ``recon_rel_error_mean`` metric stepped by iterations."""
    client = MlflowClient()
    if RECONSTRUCTION_CURVE in {a.path for a in client.list_artifacts(run_id)}:
        curve = pd.read_csv(client.download_artifacts(run_id, RECONSTRUCTION_CURVE))
        return list(zip(curve["iterations"].astype(int), curve["rel_error_mean"].astype(float), strict=True))
    history = sorted(client.get_metric_history(run_id, "recon_rel_error_mean"), key=lambda m: m.step)
    return [(m.step, m.value) for m in history]


def _estimator_study(runs: pd.DataFrame, cfg: ReportConfig, report: Report, out: Path) -> None:
    """Figs. 4/9 on a density model (``estimator_model``, else the latest density run's): real test images, exact
    log-det."""
    if cfg.estimator_model:
        source = cfg.estimator_model
        logged = require_kind(source, "density", "the estimator study")
        model = load_model(source)
        data, pad = load_dataset(logged["dataset"]), int(logged.get("pad", 0))
        repeat = int(logged.get("repeat_channels", 1))
    else:
        latest = runs.sort_values("start_time").iloc[-1]
        source = f"density run {latest['run_id']}"
        model = load_model(latest["run_id"])
        data_dir = config(latest, "data_dir")
        data = load_dataset(config(latest, "dataset"), None if data_dir in (None, "None", "") else data_dir)
        pad = int(config(latest, "pad"))
        repeat = config_int(latest, "repeat_channels", 1)  # a run of an earlier release: none
    generator = torch.Generator().manual_seed(0)
    images = pad_images(data.test.images[: cfg.estimator_images], pad, repeat)
    x = dequantize(images, data.n_levels, generator=generator)
    torch.manual_seed(0)
    rows = logdet_estimator_study(model, x, cfg.estimator_terms, n_probes=cfg.estimator_probes)
    df = pd.DataFrame(rows)
    df["model"] = source
    report.table(f"Log-det estimator: bias and std vs terms ({source})", df, "estimator_bias_std.csv")
    fig, ax = new_figure()
    ax.errorbar(
        df["n_terms"],
        df["abs_bias_bits_per_dim"].clip(lower=1e-12),
        yerr=df["bias_stderr_bits_per_dim"],
        marker="o",
        capsize=3,
        label="|bias| ± Monte-Carlo standard error",
    )
    ax.set_yscale("log")
    ax.plot(df["n_terms"], df["std_bits_per_dim"], marker="s", label="std (one probe)")
    ax.set_xlabel("power-series terms")
    ax.set_ylabel("bits/dim")
    ax.legend()
    report.figure("Figs. 4/9: log-det estimator bias and standard deviation", _save(fig, out, "fig4_estimator"))


ENTRY_POINTS = ("density", "classify", "toy", "sweep")  # the entry points whose runs the report reads


def run(cfg: ReportConfig) -> str:
    uri = configure_tracking()
    try:
        runs = tracked_runs(cfg.experiment_names, cfg.filter_string)
    except mlflow.exceptions.MlflowException as exc:  # a filter MLflow cannot parse
        raise ValueError(f"bad filter_string {cfg.filter_string!r}: {exc.message}") from None
    where = (f"experiments {', '.join(cfg.experiment_names)}" if cfg.experiment_names else "the tracking store") + (
        f" matching {cfg.filter_string!r}" if cfg.filter_string else ""
    )
    density_runs, classify_runs, toy_runs, sweep_runs = (finished_runs(e, runs=runs) for e in ENTRY_POINTS)
    if not runs["entry_point"].isin(ENTRY_POINTS).any():  # runs that did not finish are listed in report.md
        raise ValueError(
            f"no run of {', '.join(ENTRY_POINTS)} in {where} ({uri}): run an entry point first "
            "(mlflow run . -e density), or point MLFLOW_TRACKING_URI at the store that holds the runs"
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)

    t2 = table2(classify_runs)
    report.table(
        "Table 2: classification test error (%)", t2, "table2_classification.csv", empty_reason(runs, "classify", where)
    )
    t4 = table4(density_runs)
    report.table("Table 4: bits/dim", t4, "table4_bits_per_dim.csv", empty_reason(runs, "density", where))
    _classify_figures(t2, classify_runs, report, out)
    if not density_runs.empty or cfg.estimator_model:
        _estimator_study(density_runs, cfg, report, out)
        for _, r in density_runs.iterrows():
            files = [
                _copy_artifact(r["run_id"], a.path, out, f"fig5_{r['run_id'][:8]}_{a.path}")
                for a in MlflowClient().list_artifacts(r["run_id"])
                if a.path.startswith("samples_")
            ]
            report.figure(f"Fig. 5: samples, density run {r['run_id']}", [f for f in files if f])
    for _, r in toy_runs.iterrows():
        files = [
            _copy_artifact(r["run_id"], name, out, f"{name.removesuffix('.png')}_{r['run_id'][:8]}.png")
            for name in ("fig1_dynamics.png", "fig2_densities.png")
        ]
        report.figure(f"Figs. 1/2: toy run {r['run_id']}", [f for f in files if f])
        if "test_nll.csv" in {a.path for a in MlflowClient().list_artifacts(r["run_id"])}:
            nll = pd.read_csv(MlflowClient().download_artifacts(r["run_id"], "test_nll.csv")).assign(run_id=r["run_id"])
            report.table(f"Toy test NLL (nats), run {r['run_id']}", nll, f"toy_test_nll_{r['run_id'][:8]}.csv")
    for _, r in sweep_runs.iterrows():
        files = [
            _copy_artifact(r["run_id"], name, out, f"sweep_{r['run_id'][:8]}_{name}")
            for name in ("history.png", "importances.png", "contour.png", "pareto_front.png")
        ]
        report.figure(f"Sweep {r.get('tags.optuna_study', '')} (run {r['run_id']})", [f for f in files if f])
    path = report.write()
    counts = {
        "runs/density": len(density_runs),
        "runs/classify": len(classify_runs),
        "runs/toy": len(toy_runs),
        "runs/sweep": len(sweep_runs),
        "tables/table2_rows": len(t2),
        "tables/table4_rows": len(t4),
    }
    with tracked_run(
        cfg.experiment_name, run_name=cfg.run_name or "report", tags={ENTRY_POINT_TAG: "report"}
    ) as active:
        log_configuration(cfg)
        log_metrics(counts, 0)
        mlflow.log_artifacts(str(out))
        set_description(
            active.info.run_id,
            f"Tables 2 and 4 with {len(t2)} and {len(t4)} rows, from the finished runs in {where}: "
            f"{len(density_runs)} density, {len(classify_runs)} classify, {len(toy_runs)} toy, {len(sweep_runs)} "
            "sweep; report.md among the artifacts",
        )
    log.info("report written to %s", path)
    return active.info.run_id


ENTRY = EntryPoint(ReportConfig, None, run, __doc__)  # no presets: the fields are the configuration
main = ENTRY.main

if __name__ == "__main__":
    sys.exit(main())
