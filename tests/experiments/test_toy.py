import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import toy
from pipeline.models import vector_flow

TINY = dict(
    steps=40,
    steps_per_epoch=20,
    batch_size=128,
    n_test=300,
    grid_size=60,
    grid_limit=6.0,
    n_samples=200,
    dynamics_depth=4,
    dynamics_steps=30,
    progress=False,
)


def test_tiny_toy_run_end_to_end_and_densities_integrate_to_one(store):
    cfg = toy.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt"))
    run = MlflowClient().get_run(toy.run(cfg))
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for model in ("iresnet", "glow"):
        assert m[f"8gaussians/{model}/test/grid_mass"] == pytest.approx(1.0, abs=0.03)
        assert m[f"8gaussians/{model}/test/nll_nats"] < 10
    assert m["dynamics/crossings_iresnet"] == 0
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {
        "fig1_dynamics.png",
        "fig2_densities.png",
        "test_nll.csv",
        "samples_8gaussians_iresnet.png",
        "samples_8gaussians_glow.png",
    } <= artifacts


def test_iresnet_paths_never_cross_and_unconstrained_ones_can():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 50).reshape(-1, 1)
    constrained = toy.Residual1D(6, coeff=0.97)
    with torch.no_grad():
        for p in constrained.parameters():
            p.mul_(5.0)  # spectral normalisation brings every block back under c
        assert toy.count_crossings(constrained(x)) == 0
    vanilla = toy.Residual1D(6, coeff=None)
    with torch.no_grad():
        for p in vanilla.parameters():
            p.mul_(5.0)
        assert toy.count_crossings(vanilla(x)) > 0


def test_density_grid_of_an_untrained_flow_integrates_to_one():
    flow = vector_flow("quick", n_blocks=3)
    flow(torch.randn(256, 2))
    coords, density = toy.density_grid(flow, 8.0, 200, torch.device("cpu"))
    assert toy.grid_mass(coords, density) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(datasets="donut"), "unknown toy dataset"),
        (dict(models="maf"), "unknown toy model"),
        (dict(coeff=1.0), "0 < c < 1"),
        (dict(dynamics_depth=3), "even"),
    ],
)
def test_bad_toy_configuration_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        toy.config_from_preset("quick", **kw)


def test_toy_trains_with_the_unbiased_estimator_and_evaluates_exactly(store):
    cfg = toy.config_from_preset(
        "quick",
        **{**TINY, "dynamics": False},
        models="iresnet",
        estimator="russian_roulette",
        gradient="neumann",
        checkpoint_dir=str(store / "ckpt"),
    )
    run = MlflowClient().get_run(toy.run(cfg))
    assert run.info.status == "FINISHED" and run.data.params["estimator"] == "russian_roulette"
    m = run.data.metrics
    assert m["8gaussians/iresnet/test/grid_mass"] == pytest.approx(1.0, abs=0.03)  # exact densities integrate to 1
    assert m["8gaussians/iresnet/test/nll_nats"] < 10


def test_toy_refuses_a_bad_estimator():
    with pytest.raises(ValueError, match="unknown log-det estimator"):
        toy.config_from_preset("quick", estimator="neumann")
