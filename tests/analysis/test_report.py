"""The report, built from a small real tracking store made here (the smoke scale of `reproduce`)."""

import json
from pathlib import Path

import mlflow
import mlflow.projects
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import report, reproduce, tables
from analysis.tables import PAPER_TABLE2, finished_runs
from experiments.tracking_store import PROJECT_ROOT
from tests.experiments.conftest import runs_of


@pytest.mark.slow
def test_reproduce_through_mlflow_run_then_report_files_and_cells_match_the_logged_metrics(store):
    """The real `mlflow run . -e reproduce -P scale=smoke`: the launched run orchestrates, each training has its own."""
    out = store / "report"
    submitted = mlflow.projects.run(
        str(PROJECT_ROOT),
        entry_point="reproduce",
        env_manager="local",
        experiment_name="reproduce",
        parameters={"scale": "smoke", "output_dir": str(out), "checkpoint_dir": str(store / "ckpt")},
    )
    assert submitted.get_status() == "FINISHED"
    client = MlflowClient()
    orchestrator = client.get_run(submitted.run_id)
    assert orchestrator.info.status == "FINISHED"
    made = json.loads(Path(client.download_artifacts(submitted.run_id, "runs.json")).read_text())
    assert [m["entry"] for m in made] == [entry for entry, _, _ in reproduce.SCALES["smoke"]]
    for i, m in enumerate(made):
        child = client.get_run(m["run_id"])
        assert child.info.status == "FINISHED"
        assert client.get_experiment(child.info.experiment_id).name == m["entry"]
        assert child.data.tags["reproduce_run_id"] == submitted.run_id
        assert child.data.tags["mlflow.runName"] == f"reproduce-{m['entry']}"
        assert orchestrator.data.tags[f"run.{i:02d}.{m['entry']}"] == m["run_id"]
    report_id = orchestrator.data.tags["report_run_id"]
    assert client.get_run(report_id).info.status == "FINISHED"

    expected = [
        "report.md",
        "table2_classification.csv",
        "table4_bits_per_dim.csv",
        "estimator_bias_std.csv",
        "table2_error_vs_coeff.png",
        "table2_error_vs_coeff.pdf",
        "fig6_layer_norms.png",
        "fig6_layer_norms.pdf",
        "fig8_recon_vs_iterations.png",
        "fig4_estimator.png",
        "fig4_estimator.pdf",
    ]
    for name in expected:
        assert (out / name).exists(), name
    assert list(out.glob("fig3_reconstructions_*.png")) and list(out.glob("fig1_dynamics_*.png"))
    assert list(out.glob("fig3_reconstructions_*.pdf")) and list(out.glob("fig2_densities_*.pdf"))
    assert list(out.glob("fig2_densities_*.png")) and list(out.glob("fig5_*samples_*.png"))
    logged = {a.path for a in client.list_artifacts(report_id)}
    assert set(expected) <= logged

    # every table cell is the metric of the run it names
    t2 = pd.read_csv(out / "table2_classification.csv")
    assert len(t2) == 3 and set(t2["column"]) == {"c=0.9", "c=0.5", "vanilla"}
    for _, row in t2.iterrows():
        metrics = client.get_run(row["run_id"]).data.metrics
        assert row["test_error"] == pytest.approx(metrics["test/error_percent"])
        assert row["certified_invertible"] == (metrics["lipschitz/certified_invertible"] == 1.0)
        assert row["model_uri"] == f"runs:/{row['run_id']}/model"  # the row's MLflow Model
    t4 = pd.read_csv(out / "table4_bits_per_dim.csv")
    (row,) = t4.itertuples()
    metrics = client.get_run(row.run_id).data.metrics
    assert row.test_bpd == pytest.approx(metrics["test/bpd"])
    assert row.test_standard_error == pytest.approx(metrics["test/standard_error_bpd"])
    assert row.model_uri == f"runs:/{row.run_id}/model"
    est = pd.read_csv(out / "estimator_bias_std.csv")
    assert list(est["n_terms"]) == [1, 2, 3, 5, 10, 20]
    # with 20 terms the truncation is negligible: what is left is Monte-Carlo noise around zero
    assert est["abs_bias_bits_per_dim"].iloc[-1] < 4 * est["bias_stderr_bits_per_dim"].iloc[-1]
    assert (est["std_bits_per_dim"] > 0).all()
    text = Path(out / "report.md").read_text()
    for run_id in list(t2["run_id"]) + list(t4["run_id"]):
        assert run_id in text
    assert len(finished_runs("classify")) == 3 and len(runs_of("analysis")) == 1


def test_an_empty_table_names_the_runs_that_did_not_finish(store):
    client = MlflowClient()
    exp = client.create_experiment("density")
    running = client.create_run(exp, run_name="reproduce-density", tags={"reproduce_run_id": "abc"}).info.run_id
    failed = client.create_run(exp, run_name="reproduce-density", tags={"reproduce_run_id": "abc"}).info.run_id
    client.set_terminated(failed, status="FAILED")
    out = store / "report"
    report_id = report.run(report.ReportConfig(filter_string="tags.reproduce_run_id = 'abc'", output_dir=str(out)))
    text = (out / "report.md").read_text()
    assert f"`{running}` (reproduce-density, RUNNING)" in text and f"`{failed}` (reproduce-density, FAILED)" in text
    assert client.get_run(report_id).data.metrics["tables/table4_rows"] == 0


def test_paper_values_are_available_for_the_table():
    assert PAPER_TABLE2[("cifar10", "c=0.9")] == 6.78 and PAPER_TABLE2[("mnist", "vanilla")] == 0.38


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="unknown scale"):
        reproduce.ReproduceConfig(scale="huge")


def test_a_report_on_a_store_without_runs_is_refused_before_writing(store, caplog):
    out = store / "report"
    assert report.main(["--output-dir", str(out)]) == 2
    assert "no run of density, classify, toy, sweep in the tracking store" in caplog.text
    assert not out.exists()


def test_an_experiment_that_does_not_exist_is_refused_by_name(store, caplog):
    out = store / "report"
    assert report.main(["--output-dir", str(out), "--experiments", "Default,nope"]) == 2
    assert "no experiment 'nope'" in caplog.text and not out.exists()


TINY_DENSITY = {
    "dataset": "digits8x8", "n_blocks": "1,1", "hidden_channels": "8", "epochs": "2", "batch_size": "256",
    "eval_max_images": "60", "max_passes": "3", "se_tol": "0.05", "n_samples": "4",
}  # fmt: skip


@pytest.mark.slow
def test_the_readmes_density_then_report_fills_table4_with_that_run(store):
    """`mlflow run . -e density` (into MLflow's Default experiment) then `mlflow run . -e report`: the report finds
    the run by its entry_point tag, says which protocol the row follows and leaves the paper's value out."""
    density = mlflow.projects.run(
        str(PROJECT_ROOT),
        entry_point="density",
        env_manager="local",
        parameters={**TINY_DENSITY, "checkpoint_dir": str(store / "ckpt"), "progress": "false"},
    )
    assert density.get_status() == "FINISHED"
    client = MlflowClient()
    run = client.get_run(density.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "Default"
    assert run.data.tags["entry_point"] == "density" and run.data.tags["preset"] == "quick"
    assert run.info.run_name.startswith("density-quick dataset=digits8x8")  # not MLflow's made-up name
    assert run.data.tags["mlflow.note.content"].startswith(f"**test {run.data.metrics['test/bpd']:.4f} ± ")
    assert "data_dir" not in run.data.params and "n_terms" not in run.data.params  # unset; not this estimator's
    out = store / "report"
    made = mlflow.projects.run(
        str(PROJECT_ROOT), entry_point="report", env_manager="local", parameters={"output_dir": str(out)}
    )
    assert made.get_status() == "FINISHED"
    (row,) = pd.read_csv(out / "table4_bits_per_dim.csv").itertuples()
    assert row.run_id == density.run_id and row.test_bpd == pytest.approx(run.data.metrics["test/bpd"])
    assert row.protocol == "digits8x8 (not a dataset of the paper's)" and pd.isna(row.paper_bpd)
    text = (out / "report.md").read_text()
    assert density.run_id in text
    assert "_empty: no run of `classify` in the tracking store; `mlflow run . -e classify` makes one_" in text
    assert client.get_run(made.run_id).data.metrics["tables/table4_rows"] == 1


def test_paper_values_stand_only_beside_rows_of_the_papers_protocol():
    order = iter(range(10))  # run ids in the order the rows are made: the table sorts by them

    def row(dataset, images, held_out="0.0", repeats="3"):
        return pd.Series(
            {"params.config.dataset": dataset, "params.config.validation_fraction": held_out,
             "params.config.repeat_channels": repeats, "metrics.test/bpd": 1.1, "metrics.test/images": images,
             "run_id": f"{dataset}-{next(order)}"}
        )  # fmt: skip

    runs = [row("mnist", 10_000), row("mnist", 500), row("mnist", 10_000, "0.1"), row("mnist", 10_000, repeats="1")]
    runs.append(row("mnist", 10_000, repeats=None))  # a run of an earlier release: one channel
    runs.append(row("cifar10", 10_000, repeats="1"))
    table = tables.table4(pd.DataFrame(runs))
    one_channel = "mnist with its channels repeated 1x (the paper's code 3x): bits/dim per another number of dimensions"
    assert list(table["protocol"]) == [
        "paper",
        "paper",
        "mnist, 500 of 10,000 test images",
        "mnist, 10% of the training split held out for validation",
        one_channel,
        one_channel,
    ]
    assert list(table["paper_bpd"].fillna(-1)) == [3.45, 1.05, -1, -1, -1, -1]


def test_a_run_of_an_earlier_release_is_read_by_its_experiment_and_old_metric_names(store):
    client = MlflowClient()
    old = client.create_run(client.create_experiment("density")).info.run_id
    for key, value in {"test_bpd": 1.2, "test_standard_error": 0.01, "test_bias_bound": 0.0}.items():
        client.log_metric(old, key, value)
    client.log_param(old, "config.dataset", "mnist")
    client.set_terminated(old)
    (row,) = tables.table4(tables.finished_runs("density")).itertuples()
    assert (row.run_id, row.test_bpd, row.test_standard_error) == (old, 1.2, 0.01)
