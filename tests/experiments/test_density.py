"""End-to-end tests of the density entry point on tiny real data (scikit-learn's 8x8 digits)."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import density
from pipeline.tracking import PROJECT_ROOT, load_model
from tests.experiments.conftest import SimulatedCrash, assert_same_final_parameters, runs_of

TINY = dict(
    dataset="digits8x8",
    n_blocks=(1, 1),
    hidden_channels=8,
    n_power_iterations=2,
    n_terms=2,
    epochs=2,
    batch_size=128,
    eval_every=1,
    eval_max_images=60,
    max_passes=3,
    se_tol=0.05,
    n_samples=8,
    progress=False,
    log_every=2,
)


def _runs(experiment="density"):
    return runs_of(experiment)


@pytest.mark.slow
def test_mlflow_project_entry_point_end_to_end(store):
    submitted = mlflow.projects.run(
        str(PROJECT_ROOT),
        entry_point="density",
        env_manager="local",
        experiment_name="density",
        parameters={
            "dataset": "digits8x8",
            "n_blocks": "1 1",
            "hidden_channels": "8",
            "n_terms": "2",
            "epochs": "1",
            "batch_size": "256",
            "eval_max_images": "40",
            "checkpoint_dir": str(store / "ckpt"),
        },
    )
    assert submitted.get_status() == "FINISHED"
    run = MlflowClient().get_run(submitted.run_id)
    assert run.info.status == "FINISHED"
    # the resolved configuration, not the raw (possibly empty) entry-point parameters
    assert run.data.params["config.dataset"] == "digits8x8" and run.data.params["config.lr"] == "0.003"
    for key in (
        "test_bpd",
        "test_standard_error",
        "test_bias_bound",
        "test_n_terms",
        "train_loss",
        "baseline_diagonal_gaussian_test_bpd",
        "recon_max_abs_error",
    ):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in MlflowClient().list_artifacts(submitted.run_id)}
    assert {"samples_T1.png", "reconstructions.png", "history.png", "config.json"} <= artifacts
    model = load_model(submitted.run_id)
    assert model.sample(2).shape == (2, 1, 8, 8)


def test_direct_run_logs_metrics_and_a_reloadable_model(store):
    cfg = density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt"))
    run_id = density.run(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(run_id, "test_bpd")
    assert [m.step for m in history] == [0, 1, 2]  # untrained, then every epoch
    # the protocol reports the estimate with its standard error and Theorem 3 bias bound
    m = run.data.metrics
    assert m["test_n_terms"] >= 1 and m["test_bias_bound"] < 1e-4 and m["test_max_block_lipschitz"] < 1
    assert m["recon_inverse_not_converged"] == 0 and m["recon_max_abs_error"] < 1e-4
    model = load_model(run_id)
    x = torch.rand(3, 1, 8, 8) - 0.5
    assert torch.isfinite(model.log_prob(x)).all()


def test_resumed_run_ends_with_the_same_parameters_as_an_uninterrupted_one(store, crash_after_epoch):
    cfg = density.config_from_preset(
        "quick", **{**TINY, "epochs": 3, "eval_every": 0}, checkpoint_dir=str(store / "ckpt")
    )
    straight = density.run(cfg)
    crash_after_epoch(2)
    with pytest.raises(SimulatedCrash):
        density.run(cfg)
    crashed = [r for r in _runs() if r.info.run_id != straight][0]
    assert crashed.info.status == "FAILED"

    resumed = density.run(density.config_for_resume(crashed.info.run_id, checkpoint_dir=str(store / "ckpt")))
    assert resumed == crashed.info.run_id
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"
    assert_same_final_parameters(store / "ckpt", straight, resumed)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coeff", "1.0"], "0 < c < 1"),
        (["--coeff", "1.5"], "0 < c < 1"),
        (["--n-terms", "-2"], "n_terms"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["--epochs", "0"], "epochs"),
        (["--resume", "no-such-run"], "no checkpoint"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_finished_run(store, caplog, args, message):
    assert density.main([*args, "--progress", "false"]) == 2
    assert message in caplog.text
    assert not [r for r in _runs() if r.info.status == "FINISHED"]


@pytest.mark.slow
def test_bad_input_through_mlflow_run_leaves_a_failed_run(store):
    with pytest.raises(mlflow.exceptions.ExecutionException):
        mlflow.projects.run(
            str(PROJECT_ROOT),
            entry_point="density",
            env_manager="local",
            experiment_name="density",
            parameters={"coeff": "1.0"},
        )
    statuses = {r.info.status for r in _runs()}
    assert statuses == {"FAILED"}


def test_non_finite_loss_stops_the_run_and_marks_it_failed(store, monkeypatch):
    import pipeline.models.base as base

    calls = {"n": 0}
    original = base.FlowModel.prior_log_prob

    def poisoned(self, zs):
        calls["n"] += 1
        value = original(self, zs)
        return value * float("nan") if torch.is_grad_enabled() and calls["n"] > 3 else value

    monkeypatch.setattr(base.FlowModel, "prior_log_prob", poisoned)
    cfg = density.config_from_preset("quick", **{**TINY, "batch_size": 32}, checkpoint_dir=str(store / "ckpt"))
    from pipeline.training.loop import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        density.run(cfg)
    (run,) = _runs()
    assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["failure"]
