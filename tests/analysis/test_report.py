"""The report, built from a small real tracking store made here (the smoke scale of `reproduce`)."""

import json
from pathlib import Path

import mlflow
import mlflow.projects
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import report, reproduce
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
        assert row["test_error"] == pytest.approx(metrics["test_error"])
        assert row["certified_invertible"] == (metrics["certified_invertible"] == 1.0)
        assert row["model_uri"] == f"runs:/{row['run_id']}/model"  # the row's MLflow Model
    t4 = pd.read_csv(out / "table4_bits_per_dim.csv")
    (row,) = t4.itertuples()
    metrics = client.get_run(row.run_id).data.metrics
    assert row.test_bpd == pytest.approx(metrics["test_bpd"])
    assert row.test_standard_error == pytest.approx(metrics["test_standard_error"])
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
    assert client.get_run(report_id).data.metrics["table4_rows"] == 0


def test_paper_values_are_available_for_the_table():
    assert PAPER_TABLE2[("cifar10", "c=0.9")] == 6.78 and PAPER_TABLE2[("mnist", "vanilla")] == 0.38


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="unknown scale"):
        reproduce.ReproduceConfig(scale="huge")


def test_a_report_on_a_store_without_its_experiments_is_refused(store, caplog):
    out = store / "report"
    assert report.main(["--output-dir", str(out)]) == 2
    assert "none of the experiments density, classify, toy, sweep exists" in caplog.text
    assert not out.exists()


def test_a_missing_experiment_is_named_in_a_warning(store, caplog):
    MlflowClient().create_experiment("density")
    report.run(report.ReportConfig(output_dir=str(store / "report")))
    assert "experiment 'classify' does not exist" in caplog.text
