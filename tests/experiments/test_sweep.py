"""The sweep entry point: Optuna study with nested MLflow runs, failures, pruning and parallel workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from experiments import search_space, study, sweep
from tests.experiments.conftest import runs_of

TINY_DENSITY = (
    "dataset=digits8x8 n_blocks=1,1 hidden_channels=8 epochs=2 batch_size=256 eval_max_images=60 "
    "max_passes=3 se_tol=0.05 n_samples=4"
)
TINY_SPACE = {
    "coeff": {"type": "float", "low": 0.5, "high": 0.9},
    "n_terms": {"type": "int", "low": 1, "high": 3},
    "n_power_iterations": {"type": "int", "low": 1, "high": 2},
}


def _cfg(store, **kw):
    space = store / "space.json"
    space.write_text(json.dumps(TINY_SPACE))
    base = dict(
        target="density",
        target_overrides=TINY_DENSITY,
        n_trials=3,
        space_file=str(space),
        storage=f"sqlite:///{store / 'optuna.db'}",
        checkpoint_dir=str(store / "ckpt"),
        pruner="none",
    )
    return sweep.config_from_preset("quick", **{**base, **kw})


@pytest.mark.slow
def test_three_trial_study_end_to_end_with_nested_runs(store):
    parent_id = sweep.run(_cfg(store))
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    runs = runs_of("sweep")
    parent = MlflowClient().get_run(parent_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.tags["optuna_trial"]) for r in children) == [0, 1, 2]
    for child in children:  # params and per-epoch validation metrics of every trial
        assert {"coeff", "n_terms", "n_power_iterations"} <= set(child.data.params)  # every searched value
        history = MlflowClient().get_metric_history(child.info.run_id, "val_bpd")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_bpd"] == pytest.approx(study.best_value)
    assert parent.data.params["best_coeff"] == str(study.best_params["coeff"])
    best_run = study.best_trial.user_attrs["mlflow_run_id"]
    assert parent.data.tags["best_model_uri"] == f"runs:/{best_run}/model"
    assert mlflow.pyfunc.load_model(parent.data.tags["best_model_uri"]).metadata.run_id == best_run
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"trials.csv", "history.png", "search_space.json"} <= artifacts
    # resuming the study by name with a larger budget runs only the missing trials
    sweep.run(_cfg(store, n_trials=4))
    assert len(optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}").trials) == 4


def test_a_trial_that_raises_ends_failed_and_the_study_goes_on(store, monkeypatch):
    calls = {"n": 0}
    original = sweep.density.run

    def sometimes_broken(cfg, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("training loss became nan")
        return original(cfg, **kw)

    monkeypatch.setattr(sweep.density, "run", sometimes_broken)
    monkeypatch.setitem(
        sweep.TARGETS,
        "density",
        sweep.Target(sweep.density, sweep.density.DensityConfig, "val_bpd", sweep.TARGETS["density"].second),
    )
    parent_id = sweep.run(_cfg(store, target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1")))
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert MlflowClient().get_run(parent_id).data.metrics["trials_fail"] == 1


def test_pruned_trials_end_killed(store, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    sweep.run(_cfg(store, pruner="median", target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1")))
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    killed = [r for r in runs_of("sweep") if r.data.tags.get("optuna_trial") == "1"]
    assert [r.info.status for r in killed] == ["KILLED"]


@pytest.mark.slow
def test_sweep_through_mlflow_run_nests_every_trial_under_the_launched_run(store):
    submitted = mlflow.projects.run(
        str(sweep.PROJECT_ROOT),
        entry_point="sweep",
        env_manager="local",
        experiment_name="sweep",
        parameters={
            "n_trials": "2",
            "storage": f"journal:{store / 's.journal'}",
            "pruner": "none",
            "target_overrides": TINY_DENSITY.replace("epochs=2", "epochs=1"),
        },
    )
    assert submitted.get_status() == "FINISHED"
    children = [r for r in runs_of("sweep") if r.data.tags.get("mlflow.parentRunId") == submitted.run_id]
    assert sorted(r.data.tags["optuna_trial"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert MlflowClient().get_run(submitted.run_id).data.metrics["trials_complete"] == 2
    # the launched run lists the runs it made
    trials = pd.read_csv(MlflowClient().download_artifacts(submitted.run_id, "trials.csv"))
    assert sorted(trials["user_attrs_mlflow_run_id"]) == sorted(r.info.run_id for r in children)


@pytest.mark.slow
def test_two_workers_on_one_journal_finish_the_requested_trials(store):
    journal = store / "study.journal"
    space = store / "space.json"
    space.write_text(json.dumps(TINY_SPACE))
    args = [
        sys.executable,
        "-m",
        "experiments.sweep",
        "--target",
        "density",
        "--storage",
        f"journal:{journal}",
        "--study-name",
        "parallel",
        "--n-trials",
        "4",
        "--space-file",
        str(space),
        "--pruner",
        "none",
        "--target-overrides",
        TINY_DENSITY.replace("epochs=2", "epochs=1"),
        "--checkpoint-dir",
        str(store / "ckpt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [*args, "--seed", str(i)], env=env, cwd=sweep.PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0].decode() for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="parallel", storage=storage).trials
    done = [t for t in trials if not t.user_attrs.get("excess_claim")]
    assert [t.state for t in done] == [optuna.trial.TrialState.COMPLETE] * 4  # exactly --n-trials, none lost
    # a claim beyond the budget (both workers starting the last slot) never trained
    assert all(
        t.state == optuna.trial.TrialState.FAIL and "mlflow_run_id" not in t.user_attrs
        for t in trials
        if t.user_attrs.get("excess_claim")
    )
    parents = [r for r in runs_of("sweep") if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # one parent run per worker invocation


def test_a_sweep_in_which_no_trial_completes_fails(store, monkeypatch):
    def broken(cfg, **kw):
        raise FloatingPointError("training loss became nan")

    monkeypatch.setattr(sweep.density, "run", broken)
    monkeypatch.setitem(
        sweep.TARGETS,
        "density",
        sweep.Target(sweep.density, sweep.density.DensityConfig, "val_bpd", sweep.TARGETS["density"].second),
    )
    with pytest.raises(ValueError, match="no trial of study 'iresnet-sweep' completed; first failure: Floating"):
        sweep.run(_cfg(store, n_trials=2))
    (parent,) = [r for r in runs_of("sweep") if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"


@pytest.mark.parametrize(
    "space,message",
    [
        ("coeff: {type: categorical, choices: [1.5, 2.0]}", r"coeff=1.5 is invalid for density: .*coeff"),
        ("coeff: {type: float, low: 0.5, high: 1.2}", r"coeff=1.2 is invalid"),
        ("coeff: {type: float, low: 0.5", "not valid YAML"),
        ("- coeff\n- n_terms", "must map parameter names to ranges"),
        ("coeff: {type: float, low: 0.5}", "needs high"),
    ],
)
def test_a_space_that_can_produce_an_invalid_value_is_refused_before_the_study(tmp_path, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    with pytest.raises(ValueError, match=message):
        sweep.config_from_preset("quick", space_file=str(path))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_trials_on_a_device_that_does_not_exist_are_refused_before_the_study():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        sweep.config_from_preset("quick", target_overrides="device=cuda")


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(target="toy"), "unknown target"),
        (dict(objective="error-margin"), "objective for density"),
        (dict(target_overrides="epochs"), "field=value"),
        (dict(space_file="/nope.yaml"), "does not exist"),
        (dict(pruner="asha"), "unknown pruner"),
        (dict(validation_fraction=0.0), "held-out"),
    ],
)
def test_bad_sweep_configuration_is_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        sweep.config_from_preset("quick", **kw)


def test_space_file_parameters_must_be_target_options(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("n_terms: {type: int, low: 1, high: 5}\n")
    with pytest.raises(ValueError, match="not an option of classify"):
        sweep.config_from_preset("quick", target="classify", space_file=str(bad))


def test_none_is_a_value_not_an_unset_option():
    assert sweep.build_parser(sweep.SweepConfig, sweep.PRESETS, None).parse_args(["--pruner", "none"]).pruner == "none"


def test_multi_objective_mode_logs_the_pareto_front(store):
    parent_id = sweep.run(
        _cfg(store, n_trials=2, objective="bpd-time", target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1"))
    )
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 for t in study.trials)
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"pareto_front.json", "pareto_front.png"} <= artifacts
    front = json.loads(Path(client.download_artifacts(parent_id, "pareto_front.json")).read_text())
    assert {t["number"] for t in front} == {t.number for t in study.best_trials}
    assert client.get_run(parent_id).data.metrics["pareto_front_size"] == len(front)


def test_trials_can_train_with_any_estimator_through_target_overrides():
    from experiments.sweep import SweepConfig

    cfg = SweepConfig(target_overrides="estimator=russian_roulette gradient=neumann n_exact_terms=3 epochs=1")
    assert cfg.base_overrides() == {
        "estimator": "russian_roulette",
        "gradient": "neumann",
        "n_exact_terms": 3,
        "epochs": 1,
    }
    with pytest.raises(ValueError, match="unknown log-det estimator"):  # refused before any trial runs
        SweepConfig(target_overrides="estimator=roulette")


def test_reusing_a_study_with_another_objective_is_one_clear_error(store):
    optuna.create_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    with pytest.raises(ValueError, match="exists with directions \\['minimize'\\].*objective 'bpd-time'"):
        sweep.run(_cfg(store, objective="bpd-time"))


def test_workers_of_one_study_draw_different_parameters_and_one_worker_is_reproducible(tmp_path):
    """Two workers started with the same --seed on one storage: each trial gets its own draws (before, both workers'
    samplers were seeded alike and drew the same configurations), while the same single worker repeats itself."""
    space = {**TINY_SPACE, "n_power_iterations": {"type": "int", "low": 1, "high": 10}}
    cfg = sweep.config_from_preset("quick", target="density")

    def draws(storage_url: str, n_workers: int) -> list[dict]:
        storage = optuna.storages.RDBStorage(storage_url)
        workers = [
            optuna.create_study(
                study_name="s", storage=storage, load_if_exists=True, sampler=study.make_sampler(cfg.sampler, cfg.seed)
            )
            for _ in range(n_workers)
        ]
        trials = [worker.ask() for worker in workers for _ in range(2 // n_workers)]  # started together
        return [search_space.suggest(trial, space) for trial in trials]

    parallel = draws(f"sqlite:///{tmp_path / 'a.db'}", n_workers=2)
    assert parallel[0] != parallel[1]
    assert draws(f"sqlite:///{tmp_path / 'b.db'}", n_workers=1) == draws(f"sqlite:///{tmp_path / 'c.db'}", 1)


def test_an_int_parameter_needs_whole_bounds(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("n_terms: {type: int, low: 1.5, high: 3.7}\n")
    with pytest.raises(ValueError, match="'n_terms' is an int parameter: low and high must be whole numbers"):
        sweep.config_from_preset("quick", space_file=str(path))


@pytest.mark.parametrize("storage", ["bogus://x", "postgresql+nodriver://u@localhost/db"])
def test_a_storage_that_cannot_be_opened_is_one_line(store, caplog, storage):
    assert sweep.main(["--storage", storage, "--n-trials", "1"]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert "the study storage " in errors[0].getMessage() and "cannot be opened" in errors[0].getMessage()
    assert runs_of("sweep") == []  # refused before a parent run exists


def test_a_damaged_study_database_is_one_line(store, caplog):
    db = store / "optuna.db"
    db.write_bytes(os.urandom(20_000))
    assert sweep.main(["--storage", f"sqlite:///{db}", "--n-trials", "1"]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"the study storage sqlite:///{db} cannot be opened" in errors[0].getMessage()
