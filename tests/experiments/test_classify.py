"""The classify entry point on tiny real data (scikit-learn's 8x8 digits)."""

import math
from itertools import pairwise

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import classify
from experiments.tracking_store import PROJECT_ROOT
from pipeline.diagnostics import certified_lipschitz, reconstruction_error_curve
from pipeline.models import iresnet_classifier, resnet_classifier
from tests.experiments.conftest import SimulatedCrash, assert_same_final_parameters, runs_of

TINY = dict(
    dataset="digits8x8",
    n_blocks=(1, 1),
    hidden_channels=(8, 8),
    strides=(1, 2),
    injective_padding=1,
    epochs=2,
    batch_size=128,
    milestones=(),
    recon_images=4,
    recon_iterations=(1, 5, 20),
    progress=False,
)


ENTRY_POINT_PARAMETERS = {
    "dataset": "digits8x8",
    "n_blocks": "1 1",
    "hidden_channels": "8 8",
    "strides": "1 2",
    "injective_padding": "1",
    "epochs": "1",
    "batch_size": "256",
    "milestones": "",
}


def _assert_complete_classify_run(run_id: str, model: str) -> None:
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in (
        "test/error_percent",
        "test/cross_entropy_nats",
        "train/error_percent_epoch_mean",
        "train/images_per_second",
        "inverse/images_per_second",
        "lipschitz/max_layer_norm",
        "lipschitz/certified_invertible",
    ):
        assert key in run.data.metrics, key
    (logged,) = MlflowClient().search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert logged.metrics[0].key == "test/error_percent"  # the model's own score leads the models list
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {
        "reconstruction_vs_iterations.csv",
        "reconstruction_vs_iterations.png",
        "reconstructions.png",
        "layer_spectral_norms.csv",
        "layer_spectral_norms.png",
        "lipschitz.json",
    } <= artifacts
    assert run.data.tags["certified_invertible"] == (
        "true" if model == "iresnet" else run.data.tags["certified_invertible"]
    )


@pytest.mark.slow
def test_the_mlflow_entry_point_end_to_end(store):
    submitted = mlflow.projects.run(
        str(PROJECT_ROOT),
        entry_point="classify",
        env_manager="local",
        experiment_name="classify",
        parameters={**ENTRY_POINT_PARAMETERS, "model": "iresnet", "checkpoint_dir": str(store / "ckpt")},
    )
    _assert_complete_classify_run(submitted.run_id, "iresnet")


@pytest.mark.parametrize("model", [m for m in classify.MODELS if m != "iresnet"])
def test_each_other_model_end_to_end_through_the_command_line(store, model):
    """The same command line as the entry point's (the MLproject passes its parameters to ``main``), in-process."""
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in ENTRY_POINT_PARAMETERS.items()]
    argv += ["--model", model, "--checkpoint-dir", str(store / "ckpt"), "--progress", "false"]
    assert classify.main(argv) == 0
    (run,) = runs_of("classify")
    _assert_complete_classify_run(run.info.run_id, model)


def test_briefly_trained_iresnet_reconstructs_and_is_certified(store):
    cfg = classify.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt"))
    run_id = classify.run(cfg)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["lipschitz/certified_invertible"] == 1.0 and m["lipschitz/max_block_certified"] < 1
    from analysis.report import _reconstruction_curve

    curve = _reconstruction_curve(run_id)  # Fig. 8, from the run's CSV (not a metric stepped by iterations)
    assert [k for k, _ in curve] == [1, 5, 20]
    errors = [e for _, e in curve]
    assert errors[0] > errors[1] > errors[2] and errors[-1] <= 1e-4
    assert m["test/error_percent"] < 90  # it learned something in two epochs
    assert run.data.tags["mlflow.note.content"].startswith(f"**test error {m['test/error_percent']:.2f} %**")


def test_power_tolerance_and_anderson_reconstructions(store):
    cfg = classify.config_from_preset(
        "quick", **TINY, power_tol=1e-3, inverse_method="anderson", checkpoint_dir=str(store / "ckpt")
    )
    run = MlflowClient().get_run(classify.run(cfg))
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["inverse_method"] == "anderson"
    assert m["inverse/recon_inverse_not_converged"] == 0 and m["inverse/recon_rel_error_max"] < 1e-4
    assert m["lipschitz/power_iterations_mean"] >= 1 and any(k.startswith("weights/sigma_b") for k in m)


def test_classify_resume_reproduces_an_uninterrupted_run(store, crash_after_epoch):
    cfg = classify.config_from_preset("quick", **TINY, model="resnet-bn", checkpoint_dir=str(store / "ckpt"))
    straight = classify.run(cfg)
    crash_after_epoch(1)
    with pytest.raises(SimulatedCrash):
        classify.run(cfg)
    crashed = [r for r in runs_of("classify") if r.info.run_id != straight][0]
    resumed = classify.run(classify.config_for_resume(crashed.info.run_id, checkpoint_dir=str(store / "ckpt")))
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"
    assert_same_final_parameters(store / "ckpt", straight, resumed)


def test_reconstruction_error_falls_with_iterations_and_vanilla_is_not_certified(float64):
    x = torch.randn(4, 1, 28, 28)
    model = iresnet_classifier("quick", n_blocks=(1, 1, 1))
    model(x)
    model.eval()
    curve = reconstruction_error_curve(model, x, [1, 3, 10, 40])
    errors = [row["rel_error_mean"] for row in curve]
    assert all(a > b for a, b in pairwise(errors)) and errors[-1] <= 1e-4
    assert certified_lipschitz(model)[1]
    vanilla = resnet_classifier("quick", n_blocks=(1, 1, 1))
    with torch.no_grad():
        for p in vanilla.parameters():
            p.mul_(3.0)  # weights beyond any Lipschitz bound
    vanilla(x)
    bounds, certified = certified_lipschitz(vanilla.eval())
    assert not certified and max(bounds) > 1
    assert not math.isnan(max(bounds))


def test_resnet_bn_branch_bound_includes_batchnorm(float64):
    model = resnet_classifier("quick", batchnorm=True, n_blocks=(1, 1, 1))
    model(torch.randn(8, 1, 28, 28))
    bounds, _ = certified_lipschitz(model.eval())
    assert all(b > 0 and math.isfinite(b) for b in bounds)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--coeff", "1.0"], "0 < c < 1"),
        (["--model", "densenet"], "unknown model"),
        (["--optimizer", "lbfgs"], "unknown optimizer"),
        (["--dataset", "cifar10"], "needs --data-dir"),
    ],
)
def test_bad_input_gives_a_clear_error_and_no_finished_run(store, caplog, args, message):
    assert classify.main([*args, "--progress", "false"]) == 2
    assert message in caplog.text
    assert not [r for r in runs_of("classify") if r.info.status == "FINISHED"]
