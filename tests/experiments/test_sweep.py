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

from experiments import density, search_space, study, sweep, sweep_config
from experiments.command_line import build_parser
from experiments.tracking_store import PROJECT_ROOT
from tests.experiments.conftest import runs_of

TINY_DENSITY = (
    "dataset=digits8x8 n_blocks=1,1 hidden_channels=8 epochs=2 batch_size=256 eval_max_images=60 "
    "max_passes=3 se_tol=0.05 n_samples=4"
)
TINY_SPACE = {
    "coeff": {"type": "float", "low": 0.5, "high": 0.9},
    "n_exact_terms": {"type": "int", "low": 1, "high": 3},  # the quick preset's roulette estimator's terms
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
        assert {"coeff", "n_exact_terms", "n_power_iterations"} <= set(child.data.params)  # every searched value
        assert "n_terms" not in child.data.params  # the power series' option: not this estimator's
        # the validation curve on the training curve's axis (the optimizer step), at each epoch's end
        steps = {m.step for m in MlflowClient().get_metric_history(child.info.run_id, "train/bpd")}
        validation = sorted(m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val/bpd"))
        epoch_ends = sorted(m.step for m in MlflowClient().get_metric_history(child.info.run_id, "train/epoch"))
        assert len(validation) == 2 and validation == epoch_ends and max(validation) >= max(steps)
    children_params = [set(child.data.params) for child in children]
    assert all(p == children_params[0] for p in children_params)  # trials compare column by column
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/val/bpd"] == pytest.approx(study.best_value)
    # optuna-dashboard: the objective is named, the study says what it is and where its runs are
    assert study.metric_names == ["val/bpd"]
    attrs = study.user_attrs
    assert (attrs["target"], attrs["target_preset"], attrs["dataset"]) == ("density", "quick", "digits8x8")
    assert attrs["mlflow_parent_run_id"] == parent_id and "epochs=2" in attrs["target_overrides"]
    description = parent.data.tags["mlflow.note.content"]
    assert f"best trial {study.best_trial.number}: val/bpd={study.best_value:.4g}" in description
    assert "3 trials (3 complete)" in description
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
    original = density.run

    def sometimes_broken(cfg, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("training loss became nan")
        return original(cfg, **kw)

    monkeypatch.setattr(density, "run", sometimes_broken)
    monkeypatch.setitem(
        sweep.TARGETS,
        "density",
        sweep_config.Target(density, density.DensityConfig, "val/bpd", sweep.TARGETS["density"].second),
    )
    parent_id = sweep.run(_cfg(store, target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1")))
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert MlflowClient().get_run(parent_id).data.metrics["trials/fail"] == 1


def test_pruned_trials_end_killed_and_the_console_says_so(store, monkeypatch, caplog):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    with caplog.at_level("INFO", logger="experiments.sweep"):
        parent_id = sweep.run(
            _cfg(store, pruner="median", target_overrides=TINY_DENSITY.replace("epochs=2", "epochs=1"))
        )
    study = optuna.load_study(study_name="iresnet-sweep", storage=f"sqlite:///{store / 'optuna.db'}")
    assert study.trials[1].state == optuna.trial.TrialState.PRUNED
    killed = [r for r in runs_of("sweep") if r.data.tags.get("optuna_trial") == "1"]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert killed[0].data.tags["mlflow.note.content"].startswith("**KILLED**: PrunedRun: pruned at epoch 1")
    assert "trial 1 pruned after epoch 1 (val/bpd=" in caplog.text
    summary = f"study 'iresnet-sweep': 3 trials (2 complete, 1 pruned); best trial {study.best_trial.number}: "
    assert summary in caplog.text and summary in MlflowClient().get_run(parent_id).data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_sweep_through_mlflow_run_nests_every_trial_under_the_launched_run(store):
    submitted = mlflow.projects.run(
        str(PROJECT_ROOT),
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
    assert MlflowClient().get_run(submitted.run_id).data.metrics["trials/complete"] == 2
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
            [*args, "--seed", str(i)], env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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

    monkeypatch.setattr(density, "run", broken)
    monkeypatch.setitem(
        sweep.TARGETS,
        "density",
        sweep_config.Target(density, density.DensityConfig, "val/bpd", sweep.TARGETS["density"].second),
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


def test_the_default_space_searches_the_terms_of_the_estimator_in_use_and_a_dead_option_is_refused(tmp_path):
    assert "n_exact_terms" in sweep.config_from_preset("quick").space()  # the quick preset's roulette
    series = sweep.config_from_preset("quick", target_overrides="estimator=power_series epochs=1")
    assert "n_terms" in series.space() and "n_exact_terms" not in series.space()
    assert "n_terms" not in sweep.config_from_preset("quick", target="classify").space()  # no log-det
    dead = tmp_path / "space.yaml"
    dead.write_text("n_terms: {type: int, low: 1, high: 5}\n")
    with pytest.raises(ValueError, match="'n_terms' has no effect .* estimator=russian_roulette; search 'n_exact"):
        sweep.config_from_preset("quick", space_file=str(dead))


def test_none_is_a_value_not_an_unset_option():
    assert build_parser(sweep.SweepConfig, sweep.PRESETS, None).parse_args(["--pruner", "none"]).pruner == "none"


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
    assert client.get_run(parent_id).data.metrics["best/pareto_front_size"] == len(front)
    assert study.metric_names == ["val/bpd", "train/epoch_seconds"]


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


def test_an_unknown_key_in_a_search_space_entry_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("coeff: {type: float, low: 0.5, high: 0.9, lgo: true}\n")  # a typo of log
    with pytest.raises(ValueError, match=r"'coeff' has unknown key\(s\) \['lgo'\]"):
        sweep.config_from_preset("quick", space_file=str(path))


def test_a_study_reused_with_an_incompatible_space_is_refused_before_its_first_trial(store, monkeypatch):
    storage = f"sqlite:///{store / 'optuna.db'}"
    old = optuna.create_study(study_name="iresnet-sweep", storage=storage)
    old.enqueue_trial({"coeff": 0.7})
    old.optimize(lambda t: t.suggest_categorical("coeff", [0.7, 0.8]), n_trials=1)
    monkeypatch.setattr(density, "run", lambda *a, **k: pytest.fail("a trial ran"))
    with pytest.raises(ValueError, match="study 'iresnet-sweep' searched coeff as CategoricalDistribution"):
        sweep.run(_cfg(store))


def test_a_worker_runs_at_most_its_worker_trials():
    import optuna

    from experiments.study import optimize_to_budget

    study = optuna.create_study()
    optimize_to_budget(study, lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, storage=study._storage,
                       worker_trials=2)  # fmt: skip
    assert len(study.trials) == 2
    optimize_to_budget(study, lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, storage=study._storage)
    assert len(study.trials) == 5  # without a cap: the study's budget
