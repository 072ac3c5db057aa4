"""End-to-end tests of the density entry point on tiny real data (scikit-learn's 8x8 digits)."""

import math

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import density
from experiments.models import load_model
from experiments.tracking_store import PROJECT_ROOT
from pipeline.models import FLOW_PRESETS
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
    # the typed entry point's parameters (MLflow logs them), the preset, and the resolved configuration by group
    quick_lr = density.PRESETS["quick"]["lr"]  # unset parameters take the preset's value
    quick_coeff = FLOW_PRESETS["quick"].coeff  # the model preset's, through the architecture group
    params = run.data.params
    assert (params["dataset"], params["preset"], float(params["lr"]), float(params["coeff"])) == (
        "digits8x8", "quick", quick_lr, quick_coeff)  # fmt: skip
    resolved = mlflow.artifacts.load_dict(f"runs:/{submitted.run_id}/config.json")
    assert resolved["data"]["dataset"] == "digits8x8" and resolved["training"]["lr"] == quick_lr
    assert resolved["model"]["n_blocks"] == [1, 1] and resolved["model"]["input_shape"] == [1, 8, 8]
    from analysis.tables import config, finished_runs

    row = finished_runs("density").set_index("run_id").loc[submitted.run_id]
    assert config(row, "dataset") == "digits8x8" and config(row, "n_blocks") == "1,1"  # the report reads it
    for key in (
        "test/bpd",
        "test/standard_error_bpd",
        "test/bias_bound_bpd",
        "test/series_terms",
        "train/bpd",
        "test/bpd_baseline_diagonal_gaussian",
        "inverse/recon_max_abs_error",
    ):
        assert key in run.data.metrics, key
    # grouped by prefix, one series per quantity (the loss is not logged again under a second name)
    assert {key.split("/")[0] for key in run.data.metrics} <= {
        "train", "test", "eval", "lipschitz", "weights", "inverse", "samples"
    }  # fmt: skip
    assert not {"train_loss", "train/loss", "train/loss_epoch_mean"} & set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient().list_artifacts(submitted.run_id)}
    assert {"samples_T1.png", "reconstructions.png", "history.png", "config.json"} <= artifacts
    model = load_model(submitted.run_id)
    assert model.sample(2).shape == (2, 1, 8, 8)


def test_direct_run_logs_metrics_and_a_reloadable_model(store):
    cfg = density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt"))
    run_id = density.run(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    client = MlflowClient()
    # every epoch, on the training curve's axis: the optimizer step at the epoch's end
    epoch_ends = sorted(m.step for m in client.get_metric_history(run_id, "train/epoch"))
    assert sorted(m.step for m in client.get_metric_history(run_id, "test/bpd")) == epoch_ends and len(epoch_ends) == 2
    assert max(m.step for m in client.get_metric_history(run_id, "train/bpd")) <= epoch_ends[-1]
    # the protocol reports the estimate with its standard error and Theorem 3 bias bound
    m = run.data.metrics
    assert m["test/series_terms"] >= 1 and m["test/bias_bound_bpd"] < 1e-4 and m["test/max_block_lipschitz"] < 1
    assert m["inverse/recon_inverse_not_converged"] == 0 and m["inverse/recon_max_abs_error"] < 1e-4
    # the logged model carries its own test result, first; the baseline is a run metric named as one
    (logged,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert logged.metrics[0].key == "test/bpd" and logged.metrics[0].value == m["test/bpd"]
    assert "test/bpd_baseline_diagonal_gaussian" not in {metric.key for metric in logged.metrics}
    # the run reads at a glance: named after what it trains, its result in its description
    assert run.info.run_name.startswith("density-quick") and run.data.tags["entry_point"] == "density"
    assert run.data.tags["mlflow.note.content"].startswith(f"**test {m['test/bpd']:.4f} ± ")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's training view
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
        (["--estimator", "power_series", "--n-terms", "-2"], "n_terms"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "does not exist"),
        (["--epochs", "0"], "epochs"),
        (["--resume", "no-such-run"], "no checkpoint"),
        (["--estimator", "russian"], "unknown log-det estimator"),
        (["--gradient", "adjoint"], "unknown gradient"),
        (["--estimator", "russian_roulette", "--roulette-p", "1.5"], "geometric parameter"),
        (["--inverse-method", "newton"], "unknown inverse method"),
        (["--power-tol", "-1"], "power_tol"),
        (["--variance-repeats", "1"], "variance_repeats"),
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

    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        density.run(cfg)
    (run,) = _runs()
    assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["failure"]


def test_unbiased_estimator_memory_saving_gradient_and_anderson_inverse_in_one_run(store):
    cfg = density.config_from_preset(
        "quick",
        **TINY,
        estimator="russian_roulette",
        gradient="neumann",
        n_exact_terms=1,
        inverse_method="anderson",
        power_tol=1e-4,
        variance_repeats=4,
        checkpoint_dir=str(store / "ckpt"),
    )
    run_id = density.run(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    resolved = mlflow.artifacts.load_dict(f"runs:/{run_id}/config.json")
    assert resolved["estimator"]["estimator"] == "russian_roulette" and resolved["estimator"]["gradient"] == "neumann"
    assert p["inverse_method"] == "anderson" and p["estimator"] == "russian_roulette"  # every option that applies
    model = load_model(run_id)
    assert m["inverse/recon_inverse_not_converged"] == 0 and m["inverse/recon_max_abs_error"] < 1e-4
    assert "inverse/recon_inverse_fallbacks" in m
    assert m["train/logdet_std_bpd"] > 0 and m["train/logdet_std_bpd_max_block"] <= m["train/logdet_std_bpd"]
    # every spectrally normalised layer's estimate is logged each epoch (in a section of their own), with the
    # power-iteration steps, at the optimizer step of the epoch's end
    n_layers = 3 * len(model.residual_blocks())
    sigma_keys = [k for k in m if k.startswith("weights/sigma_b")]
    assert len(sigma_keys) == n_layers and m["lipschitz/power_iterations_mean"] >= 2  # n_power_iterations=2 minimum
    epoch_ends = sorted(h.step for h in MlflowClient().get_metric_history(run_id, "train/epoch"))
    assert sorted(h.step for h in MlflowClient().get_metric_history(run_id, sigma_keys[0])) == epoch_ends
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert "logdet_variance.csv" in artifacts


def test_the_training_path_logdet_is_an_unbiased_estimate_of_the_flows_logdet(store):
    """With the Neumann gradient (graph-carrying path, as logged in train_logdet) the value is the estimate itself."""
    from pipeline.data import dequantize, load_dataset
    from pipeline.transforms import ExactLogDet, RussianRouletteLogDet

    cfg = density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt"), variance_repeats=0)
    model = load_model(density.run(cfg))  # eval mode: fixed normalisation, so draws differ only in the estimator
    x = dequantize(load_dataset("digits8x8").train.images[:64], 17)
    torch.manual_seed(0)
    with torch.no_grad(), model.estimator(ExactLogDet()):
        exact = model(x)[1].mean()
    estimates = []
    with model.estimator(RussianRouletteLogDet(gradient="neumann")):
        for _ in range(200):
            _, logdet = model(x)
            assert logdet.requires_grad  # the memory-saving training path, not the no-grad evaluation one
            estimates.append(logdet.detach().mean())
    estimates = torch.stack(estimates)
    stderr = estimates.std() / math.sqrt(len(estimates))
    assert abs(float(estimates.mean() - exact)) < 4 * float(stderr)


def test_deterministic_holds_for_a_run_started_from_the_library_and_is_undone_after_it(store):
    """A sweep's trial and ``reproduce`` call ``run(cfg)``, not the command line: ``deterministic=True`` must hold
    there too (a GPU run resumed from the library differed from the uninterrupted one when it did not)."""
    seen = []
    cfg = density.config_from_preset("quick", **{**TINY, "epochs": 1}, deterministic=True,
                                     checkpoint_dir=str(store / "ckpt"))  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()
    density.run(cfg, on_epoch_end=lambda epoch, _: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_a_deterministic_run_trains_and_reproduces_itself(store):
    """--deterministic: every op the density run uses has a deterministic kernel (else PyTorch raises)."""
    args = ["--checkpoint-dir", str(store / "ckpt"), "--deterministic", "true", "--epochs", "1"]
    for key, value in TINY.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        if key != "epochs":
            args += [f"--{key.replace('_', '-')}", text]
    try:
        assert density.main(args) == 0 and density.main(args) == 0
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    first, second = (MlflowClient().get_metric_history(r.info.run_id, "train/bpd") for r in _runs())
    assert [m.value for m in first] == [m.value for m in second]


def test_the_papers_mnist_protocol_sees_3_channels_of_32x32_scores_per_3072_dims_and_serves_28x28(store, tmp_path):
    """paper-mnist as the paper's code: pad 2, the digit repeated to 3 channels, each copy dequantised on its own;
    the flow is 3x32x32 (bits/dim per 3,072 dimensions) and the logged model still takes 1x28x28 uint8 digits."""
    import numpy as np

    from tests.data.test_registry import _write_mnist

    _write_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    tiny = dict(n_blocks=(1, 1, 1), hidden_channels=4, n_power_iterations=2, n_terms=2, epochs=1, batch_size=32)
    tiny |= dict(warmup_steps=0, eval_every=0, max_passes=2, se_tol=1.0, n_samples=4, progress=False, log_every=1)
    cfg = density.config_from_preset(
        "paper-mnist", data_dir=str(tmp_path / "mnist"), checkpoint_dir=str(store / "ckpt"), **tiny
    )
    assert (cfg.pad, cfg.repeat_channels, cfg.architecture_option("input_activation")) == (2, 3, True)
    assert cfg.architecture_option("squeeze_order") == "position_major"
    run_id = density.run(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["input_shape"] == "(3, 32, 32)"
    model = load_model(run_id)
    assert model.dim == 3 * 32 * 32
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)
    answer = served.predict(np.zeros((2, 1, 28, 28), np.uint8))
    assert np.isfinite(answer["bits_per_dim"]).all()


def test_repeated_channels_are_dequantised_apart_and_bits_per_dim_are_per_every_dimension():
    from pipeline.data import dequantize, pad_images
    from pipeline.data.registry import ImageSplit
    from pipeline.evaluation import diagonal_gaussian_baseline_bits_per_dim

    images = torch.randint(0, 256, (400, 1, 28, 28), dtype=torch.uint8)
    repeated = pad_images(images, 2, 3)
    assert repeated.shape == (400, 3, 32, 32) and all(
        torch.equal(repeated[:, k, 2:30, 2:30], images[:, 0]) for k in range(3)
    )
    x = dequantize(repeated, 256)
    assert not torch.equal(x[:, 0], x[:, 1])  # each copy its own noise
    centre = (repeated.double() + 0.5) / 256 - 0.5
    assert ((x.double() - centre).abs() <= 0.5 / 256 + 1e-6).all()  # and each within its level of the same image
    train, test = ImageSplit(images[:300], torch.zeros(300)), ImageSplit(images[300:], torch.zeros(100))
    one = diagonal_gaussian_baseline_bits_per_dim(train, test, n_levels=256, pad=2)
    three = diagonal_gaussian_baseline_bits_per_dim(train, test, n_levels=256, pad=2, repeat_channels=3)
    # the same per-dimension model three times over: per dimension the same bits (3,072 of them, not 1,024)
    assert abs(three - one) < 0.05 and abs(three * 3 - one) > 1
