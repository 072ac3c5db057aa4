"""Every failure an entry point meets ends in one clear line, the right recorded state, and nothing lost."""

import json
import os
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis import report
from experiments import classify, density, toy
from experiments.models import load_model
from pipeline.data import load_dataset
from tests.experiments.conftest import SimulatedCrash, runs_of
from tests.experiments.test_density import TINY

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def _density_args(store, *extra: str) -> list[str]:
    args = ["--checkpoint-dir", str(store / "ckpt")]
    for key, value in TINY.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        args += [f"--{key.replace('_', '-')}", text]
    return args + list(extra)


def _one_error_line(caplog) -> str:
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None  # no traceback for a user error
    return errors[0].getMessage()


def test_density_batch_larger_than_the_data_is_refused_before_any_run(store, caplog):
    assert density.main(_density_args(store, "--batch-size", "100000")) == 2
    assert "batch_size 100000 exceeds the" in _one_error_line(caplog)
    assert runs_of("density") == []  # no run that looks finished, and none at all


def test_classify_batch_larger_than_the_data_is_one_line(store, caplog):
    cfg_args = ["--dataset", "digits8x8", "--batch-size", "100000", "--epochs", "1", "--progress", "false"]
    assert classify.main(cfg_args) == 2
    assert "exceeds the" in _one_error_line(caplog)


@NO_GPU
@pytest.mark.parametrize("entry", [density, classify])
def test_a_gpu_that_is_not_there_is_one_line(store, caplog, entry):
    assert entry.main(["--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in _one_error_line(caplog)


def test_a_truncated_checkpoint_names_the_file(store, caplog):
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    path = store / "ckpt" / run_id / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt"), "--epochs", "3"]) == 2
    assert str(path) in _one_error_line(caplog)


def test_a_pickled_checkpoint_of_an_older_version_is_refused(store, caplog):
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    path = store / "ckpt" / run_id / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model_object"] = torch.nn.Linear(2, 2)  # a pickled module, as older checkpoints held
    torch.save(state, path)
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt"), "--epochs", "3"]) == 2
    message = _one_error_line(caplog)
    assert str(path) in message and "could run arbitrary code" in message


def test_resuming_against_another_tracking_store_is_one_line(store, caplog, monkeypatch):
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'other.db'}")
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt"), "--epochs", "3"]) == 2
    assert f"no run '{run_id}' in sqlite:///{store / 'other.db'}" in _one_error_line(caplog)


def test_an_unreachable_tracking_server_is_one_line_at_once(store, caplog, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    assert density.main(_density_args(store)) == 2
    assert f"the tracking store http://127.0.0.1:{port} is unreachable" in _one_error_line(caplog)


def test_report_errors_are_one_line(store, caplog, tmp_path):
    density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    assert report.main(["--filter-string", "params.coeff ==== 'x'", "--output-dir", str(tmp_path / "r")]) == 2
    _one_error_line(caplog)
    caplog.clear()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert report.main(["--output-dir", str(a_file / "out")]) == 2  # cannot be a directory (even for root)
    assert "Not a directory" in _one_error_line(caplog)


def test_resuming_a_finished_run_is_refused_unless_it_trains_further(store, caplog):
    ckpt = str(store / "ckpt")
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=ckpt))
    n_models = len(MlflowClient().list_artifacts(run_id, "model"))
    logged = MlflowClient().get_metric_history(run_id, "test/bpd")
    assert density.main(["--resume", run_id, "--checkpoint-dir", ckpt]) == 2
    assert f"run {run_id} already FINISHED all 2 epochs" in _one_error_line(caplog)
    assert MlflowClient().get_metric_history(run_id, "test/bpd") == logged  # nothing re-logged
    assert len(MlflowClient().list_artifacts(run_id, "model")) == n_models
    assert density.main(["--resume", run_id, "--checkpoint-dir", ckpt, "--epochs", "3"]) == 0  # extending is fine
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_run_resumed_after_a_crash_mid_epoch_logs_each_step_once(store, monkeypatch):
    import pipeline.models.base as base

    cfg = density.config_from_preset(
        "quick", **{**TINY, "epochs": 3, "eval_every": 0, "batch_size": 32, "log_every": 1},
        checkpoint_dir=str(store / "ckpt"),
    )  # fmt: skip
    straight = density.run(cfg)
    calls = {"n": 0}
    original = base.FlowModel.prior_log_prob
    steps_per_epoch = len(load_dataset("digits8x8").train) // 32

    def crash_in_epoch_two(self, zs):
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] == steps_per_epoch + 20:
                raise SimulatedCrash("killed mid-epoch")
        return original(self, zs)

    monkeypatch.setattr(base.FlowModel, "prior_log_prob", crash_in_epoch_two)
    with pytest.raises(SimulatedCrash):
        density.run(cfg)
    monkeypatch.setattr(base.FlowModel, "prior_log_prob", original)
    crashed = next(r.info.run_id for r in runs_of("density") if r.info.run_id != straight)
    client = MlflowClient()
    assert max(m.step for m in client.get_metric_history(crashed, "train/bpd")) > steps_per_epoch  # partial epoch
    density.run(density.config_for_resume(crashed, checkpoint_dir=str(store / "ckpt")))
    for key in ("train/bpd", "train/epoch_seconds", "train/bpd_epoch_mean", "test/bpd"):
        steps = [m.step for m in client.get_metric_history(crashed, key)]
        assert len(steps) == len(set(steps)), key  # no step logged twice
        assert sorted(steps) == sorted(m.step for m in client.get_metric_history(straight, key)), key
    straight_loss = {m.step: m.value for m in client.get_metric_history(straight, "train/bpd")}
    assert {m.step: m.value for m in client.get_metric_history(crashed, "train/bpd")} == straight_loss


def test_a_logged_model_is_weights_and_json_and_reloads(store):
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(store / "m")))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/network/weights.pt", "artifacts/network/model.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]  # models from code: nothing pickled
    spec = json.loads((folder / "artifacts/network/model.json").read_text())
    assert spec["class"] == "IResNetFlow" and spec["architecture"]["n_blocks"] == [1, 1]
    model = load_model(run_id)
    x = torch.rand(4, *model.input_shape) - 0.5
    assert torch.isfinite(model.log_prob(x)).all()


def test_a_run_logged_before_mlflow_models_still_loads(store):
    """Older runs hold their model as plain artifacts (model/weights.pt + model/model.json, no MLmodel)."""
    import tempfile

    from pipeline.models.serialization import save_model

    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    trained = load_model(run_id)
    with mlflow.start_run() as old, tempfile.TemporaryDirectory() as tmp:
        save_model(trained, tmp)
        mlflow.log_artifacts(tmp, artifact_path="model")
    again = load_model(old.info.run_id)
    for a, b in zip(trained.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def small_filesystem(tmp_path):
    """``small_filesystem(n_bytes)``: a real filesystem of that size (a tmpfs), unmounted after the test."""
    mounted = []

    def mount(n_bytes: int) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={n_bytes}", "tmpfs", str(point)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(store, caplog, small_filesystem):
    one_epoch = density.run(density.config_from_preset("quick", **{**TINY, "epochs": 1}, checkpoint_dir=str(store)))
    size = (store / one_epoch / "last.pt").stat().st_size
    # room for one checkpoint and the lease, not for the next checkpoint written beside it
    disk = small_filesystem((size * 3 // 2 // 4096 + 3) * 4096)
    assert density.main(_density_args(store, "--checkpoint-dir", str(disk), "--eval-every", "0")) == 2
    message = _one_error_line(caplog)
    run = next(r for r in runs_of("density") if r.info.run_id != one_epoch)
    path = disk / run.info.run_id / "last.pt"
    assert f"CheckpointWriteError: cannot write the checkpoint {path}" in message
    assert "bytes free on its filesystem" in message and "the last good checkpoint (epoch 1) is kept" in message
    assert run.info.status == "FAILED" and "cannot write the checkpoint" in run.data.tags["failure"]
    assert torch.load(path, weights_only=True)["epoch"] == 1  # intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "lease"]  # no partial file left


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_sqlite_tracking_store_is_one_line_naming_it(store, caplog, monkeypatch, damage):
    db = store / "damaged.db"
    if damage == "random bytes":
        db.write_bytes(os.urandom(50_000))
    else:
        density.run(density.config_from_preset("quick", **{**TINY, "epochs": 1}, checkpoint_dir=str(store / "c")))
        db.write_bytes((store / "mlflow.db").read_bytes()[:30_000])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert density.main(_density_args(store)) == 2
    assert f"the tracking store sqlite:///{db} cannot be read" in _one_error_line(caplog)


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--lr", "inf", "lr must be a finite number, got inf"),
        ("--coeff", "nan", "coeff must be a finite number, got nan"),
        ("--seed", "-1", "seed must be >= 0"),
    ],
)
def test_non_finite_floats_and_a_negative_seed_are_refused_before_any_run(store, caplog, option, value, message):
    assert density.main(_density_args(store, option, value)) == 2
    assert message in _one_error_line(caplog)
    assert runs_of("density") == []


@pytest.mark.parametrize("entry", [density, classify])
def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_run(store, caplog, entry):
    a_file = store / "a-file"
    a_file.write_text("")
    args = ["--checkpoint-dir", str(a_file / "sub"), "--epochs", "1", "--dataset", "digits8x8"]
    assert entry.main(args) == 2
    assert f"checkpoint_dir {a_file / 'sub'} cannot be a directory: {a_file} is a file" in _one_error_line(caplog)
    assert runs_of(entry.__name__.rsplit(".", 1)[-1]) == []


def test_resuming_a_run_with_another_entry_point_names_the_one_that_started_it(store, caplog):
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    assert classify.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt")]) == 2
    assert (
        f"run {run_id} was not started by classify but by density; resume it with python -m experiments.density "
        f"--resume {run_id}"
    ) in _one_error_line(caplog)


def test_eval_every_zero_says_what_it_means(store, caplog):
    with caplog.at_level("INFO"):
        density.run(density.config_from_preset("quick", **{**TINY, "eval_every": 0}, checkpoint_dir=str(store)))
    assert "eval_every=0: the flow is evaluated once, after the last epoch (2)" in caplog.text


def test_a_stale_mlflow_run_id_naming_a_finished_run_is_refused_not_trained_into(store, caplog, monkeypatch):
    ckpt = str(store / "ckpt")
    finished = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=ckpt))
    before = MlflowClient().get_run(finished)
    monkeypatch.setenv("MLFLOW_RUN_ID", finished)
    assert density.main(_density_args(store, "--seed", "5")) == 2
    assert f"MLFLOW_RUN_ID names run {finished}, which is FINISHED" in _one_error_line(caplog)
    after = MlflowClient().get_run(finished)
    assert after.info.status == "FINISHED" and after.data.params == before.data.params
    assert after.data.metrics == before.data.metrics


@pytest.mark.parametrize(
    "entry, options, message",
    [
        ("density", {"register_model": "team/flow"}, "register_model 'team/flow' is not a Model Registry name"),
        ("density", {"threads": 10_000}, "threads must be 0 (the cores shared out) to"),
        ("toy", {"grid_size": 1}, "grid_size must be >= 2"),
    ],
)
def test_what_can_be_refused_up_front_is_refused_before_any_run(store, entry, options, message):
    module = {"density": density, "toy": toy}[entry]
    with pytest.raises(ValueError, match=re.escape(message)):
        module.config_from_preset("quick", **options)
    assert not runs_of(entry)


def test_a_resume_may_change_the_registry_name():
    from experiments.config import RESUME_OVERRIDABLE

    assert "register_model" in RESUME_OVERRIDABLE


@pytest.mark.parametrize("left", ["PENDING", "FAILED"])
def test_a_resume_of_a_run_stopped_while_logging_its_model_finishes_only_what_is_missing(store, left):
    """Killed (PENDING: kill -9, nothing could mark it) or stopped (FAILED) inside the model's logging, after the
    final metrics: the resume logs the model once, each final metric once, and the true evaluation CPU share."""
    from mlflow.entities import LoggedModelStatus

    ckpt = str(store / "ckpt")
    original = mlflow.pyfunc.log_model

    def die(*args, **kwargs):
        raise SimulatedCrash("killed while logging the model")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(SimulatedCrash):
        patch.setattr(mlflow.pyfunc, "log_model", die)
        if left == "PENDING":  # kill -9: nothing runs after the crash, the model is never finalized
            patch.setattr(MlflowClient, "finalize_logged_model", lambda *a, **k: (_ for _ in ()).throw(OSError()))
        density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=ckpt))
    assert mlflow.pyfunc.log_model is original
    (run,) = runs_of("density")
    client = MlflowClient()
    of_run = f"source_run_id = '{run.info.run_id}'"
    (orphan,) = client.search_logged_models([run.info.experiment_id], filter_string=of_run)
    assert orphan.status == getattr(LoggedModelStatus, left)
    assert density.main(["--resume", run.info.run_id, "--checkpoint-dir", ckpt]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    models = client.search_logged_models([run.info.experiment_id], filter_string=of_run)
    assert [(m.model_id, m.status) for m in models] == [(orphan.model_id, LoggedModelStatus.READY)]  # completed
    assert {m.key for m in models[0].metrics} >= {"test/bpd", "test/standard_error_bpd"}
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/lr"))
    for key in ("test/bpd", "inverse/recon_max_abs_error", "lipschitz/max_block_certified", "eval/cpu_fraction"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps.count(last) == 1 and max(steps) == last, (key, steps)  # once
    fraction = run.data.metrics["eval/cpu_fraction"]
    assert 0 < fraction < 1  # the evaluation's share of the processes that made the model, not 0 of this one
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model") is not None


def _finished_run(store) -> tuple[str, Path]:
    run_id = density.run(density.config_from_preset("quick", **TINY, checkpoint_dir=str(store / "ckpt")))
    return run_id, store / "ckpt" / run_id / "last.pt"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("model"), "lacks model"),
        (lambda s: s.update(epoch=1_000_000), "records epoch 1000000 of a run of 2 epochs"),
        (
            lambda s: s["model"].update({k: torch.zeros(3, 3) for k in list(s["model"])[:5] if "weight" in k}),
            r"do not fit this model \(\d+ tensors of another shape: .*\(3, 3\)",
        ),
        (lambda s: s["model"].update(extra=torch.zeros(1)), "1 tensors unexpected: extra"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_and_the_finished_run_stays_finished(store, caplog, damage, message):
    run_id, path = _finished_run(store)
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    history = MlflowClient().get_metric_history(run_id, "test/bpd")
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt"), "--epochs", "3"]) == 2
    line = _one_error_line(caplog)
    assert str(path) in line and re.search(message, line), line
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    assert MlflowClient().get_metric_history(run_id, "test/bpd") == history


def test_random_bytes_as_a_checkpoint_are_not_called_a_pickle(store, caplog):
    run_id, path = _finished_run(store)
    path.write_bytes(os.urandom(4096))
    assert density.main(["--resume", run_id, "--checkpoint-dir", str(store / "ckpt"), "--epochs", "3"]) == 2
    line = _one_error_line(caplog)
    assert "cannot be read (truncated or not a checkpoint)" in line and "arbitrary code" not in line


def test_a_logged_model_whose_weights_do_not_fit_is_one_line(store):
    from pipeline.models.serialization import load_model_folder

    run_id, _ = _finished_run(store)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(store / "m")))
    weights = folder / "artifacts" / "network" / "weights.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({k: torch.zeros(2) if v.numel() else v for k, v in state.items()}, weights)
    with pytest.raises(ValueError, match=r"the weights in .*weights\.pt do not fit this model \(\d+ tensors of anot"):
        load_model_folder(folder / "artifacts" / "network")
    weights.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"weights\.pt cannot be read as weights"):
        load_model_folder(folder / "artifacts" / "network")


def test_a_command_line_argparse_refuses_under_mlflow_run_is_the_launched_runs_failure_reason(store, monkeypatch):
    launched = MlflowClient().create_run(MlflowClient().get_experiment_by_name("Default").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    with pytest.raises(SystemExit) as stopped:
        density.main(["--epochs", "two"])
    assert stopped.value.code == 2
    reason = MlflowClient().get_run(launched.info.run_id).data.tags["failure"]
    assert reason.startswith("invalid command line: python -m experiments.density: error: argument --epochs")


def test_compile_with_the_neumann_gradient_is_refused_before_any_run(store, caplog):
    assert density.main(_density_args(store, "--compile", "true", "--estimator", "power_series")) == 2
    assert "compile traces the training step with gradient=backprop" in _one_error_line(caplog)
    assert runs_of("density") == []
