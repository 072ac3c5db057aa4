"""Trained models as MLflow Models: pyfunc from code, the registry, dataset lineage, system metrics, serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import classify, density, toy
from experiments.models import load_model, model_kind, require_kind
from experiments.tracking_store import PROJECT_ROOT
from pipeline.data import load_dataset
from pipeline.models.scoring import score
from tests.experiments.test_classify import TINY as TINY_CLASSIFY
from tests.experiments.test_density import TINY
from tests.experiments.test_distributed import _free_port


def _density_run(store, **overrides) -> str:
    return density.run(density.config_from_preset("quick", **{**TINY, **overrides}, checkpoint_dir=str(store / "c")))


def test_a_density_run_logs_a_pyfunc_model_that_scores_as_the_library_does(store):
    run_id = _density_run(store)
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["model_uri"] == f"runs:/{run_id}/model"
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    inputs = pyfunc.metadata.get_input_schema().inputs[0]
    assert inputs.type == np.dtype(np.uint8) and inputs.shape == (-1, 1, 8, 8)
    images = load_dataset("digits8x8").test.images[:5].numpy()
    served = pyfunc.predict(images)
    assert list(served.columns) == ["bits_per_dim", "standard_error"] and len(served) == 5
    ours = score(load_model(run_id), "density", images, {"n_levels": 17, "pad": 0})
    assert np.array_equal(served["bits_per_dim"].to_numpy(), ours["bits_per_dim"])
    assert (served["standard_error"] > 0).all()
    assert abs(served["bits_per_dim"].mean() - run.data.metrics["test/bpd"]) < 0.5  # the same model, other images
    with pytest.raises(Exception, match="Shape of input"):
        pyfunc.predict(np.zeros((2, 1, 7, 8), np.uint8))
    # the data that trained and scored it
    datasets = {d.dataset.name: d.tags[0].value for d in run.inputs.dataset_inputs}
    assert datasets == {"digits8x8-training": "training", "digits8x8-test": "test"}
    assert all(d.dataset.digest and d.dataset.source for d in run.inputs.dataset_inputs)


def test_register_model_makes_a_version_that_load_model_and_pyfunc_take(store, caplog):
    run_id = _density_run(store, register_model="digits-flow")
    version = MlflowClient().get_model_version("digits-flow", "1")
    assert version.run_id == run_id and version.status == "READY"
    MlflowClient().set_registered_model_alias("digits-flow", "champion", "1")
    refs = (run_id, "models:/digits-flow/1", "models:/digits-flow@champion")
    by_run, by_version, by_alias = (load_model(ref) for ref in refs)
    for model in (by_version, by_alias):
        for a, b in zip(by_run.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert model_kind("models:/digits-flow/1") == "density"
    with pytest.raises(ValueError, match="no model at models:/nope/1"):
        load_model("models:/nope/1")
    with pytest.raises(ValueError, match="no model at models:/digits-flow/7"):
        load_model("models:/digits-flow/7")
    with pytest.raises(ValueError, match="is not a model reference"):
        load_model("latest")


def test_a_classifier_is_a_pyfunc_model_of_class_probabilities(store):
    cfg = classify.config_from_preset(
        "quick", **{**TINY_CLASSIFY, "epochs": 1, "recon_images": 2, "recon_iterations": (1, 2)},
        checkpoint_dir=str(store / "c"),
    )  # fmt: skip
    run_id = classify.run(cfg)
    images = load_dataset("digits8x8").test.images[:4].numpy()
    probabilities = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(images)
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1.0)
    with open(MlflowClient().download_artifacts(run_id, "normalization.json", str(store))) as f:
        normalization = json.load(f)
    ours = score(load_model(run_id), "classify", images, normalization)
    assert np.array_equal(probabilities, ours["probabilities"])
    assert model_kind(run_id) == "classify"
    with pytest.raises(ValueError, match="is a classify model; the estimator study needs a density model"):
        require_kind(run_id, "density", "the estimator study")


def test_a_toy_run_logs_its_models_as_log_density_models_and_system_metrics(store):
    mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        cfg = toy.config_from_preset(
            "quick", models="glow,iresnet", steps=100, steps_per_epoch=100, dynamics=False, grid_size=20, n_test=200,
            n_samples=50, log_system_metrics=True, checkpoint_dir=str(store / "c"), progress=False,
        )  # fmt: skip
        started = time.monotonic()
        run_id = toy.run(cfg)
        if time.monotonic() - started < 2.5:  # MLflow's monitor samples once a second
            pytest.skip("the run ended before the system monitor logged")
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
        mlflow.set_system_metrics_samples_before_logging(None)
    points = np.array([[0.0, 0.0], [2.0, 0.0]], np.float32)
    for name in ("iresnet", "glow"):  # every trained model, the baseline too
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/8gaussians-{name}")
        ours = score(load_model(f"runs:/{run_id}/8gaussians-{name}"), "toy", points, {})
        assert np.array_equal(pyfunc.predict(points), ours["log_density"])
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_what_the_library_computes(store):
    run_id = _density_run(store, register_model="served-flow")
    port = _free_port()
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served-flow/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "the model server did not start"
                time.sleep(0.5)
        images = load_dataset("digits8x8").test.images[:3].numpy()
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images.tolist()})
        assert status == 200, answer
        ours = score(load_model("models:/served-flow/1"), "density", images, {"n_levels": 17, "pad": 0})
        served = [row["bits_per_dim"] for row in answer["predictions"]]
        assert np.allclose(served, ours["bits_per_dim"], rtol=0, atol=1e-9)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": images[:, :, :4].tolist()})
        assert 400 <= status < 500 and "Shape of input" in answer.get("message", ""), (status, answer)
        for wrong in ((images.astype(np.int64) + 300).tolist(), [["a pixel"]]):  # not uint8 (MLflow casts numbers)
            status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": wrong})
            assert 400 <= status < 500 and "Traceback" not in json.dumps(answer), (status, answer)
        # ordinary 8-bit pixels for a 17-level model: HTTP 400 with the range, not NaN with 200
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": np.full_like(images, 200).tolist()})
        assert status == 400 and "pixel values must be 0 to 16" in answer.get("message", ""), (status, answer)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_report_takes_a_registered_density_model_and_refuses_another_kind(store, caplog, tmp_path):
    from analysis import report

    _density_run(store, register_model="study-flow")
    args = ["--output-dir", str(tmp_path / "r"), "--estimator-images", "1", "--estimator-terms", "1 2"]
    assert report.main([*args, "--estimator-model", "models:/study-flow/1"]) == 0
    assert "models:/study-flow/1" in (tmp_path / "r" / "report.md").read_text()
    caplog.clear()
    assert report.main([*args, "--estimator-model", "models:/no-such-model/1"]) == 2
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "no model at models:/no-such-model/1" in error.getMessage()


def test_scoring_refuses_pixels_beyond_the_models_levels_and_oversized_requests_and_chunks_the_rest():
    from dataclasses import replace

    from pipeline.models import FLOW_PRESETS, IResNetFlow, scoring

    arch = replace(FLOW_PRESETS["quick"], n_blocks=(1, 1), hidden_channels=(8,), input_shape=(1, 8, 8))
    flow = IResNetFlow(arch)
    with torch.no_grad():
        flow.log_prob(torch.rand(16, 1, 8, 8) - 0.5)  # the data-dependent initialisation, as training starts
    flow.eval()
    config = {"n_levels": 17, "pad": 0, "passes": 2}
    images = np.random.default_rng(0).integers(0, 17, (scoring.CHUNK_IMAGES + 3, 1, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="pixel values must be 0 to 16 .* got 17"):
        scoring.score(flow, "density", np.where(images == 0, 17, images).astype(np.uint8), config)
    with pytest.raises(ValueError, match=f"at most {scoring.MAX_REQUEST_IMAGES} inputs per request"):
        scoring.score(flow, "density", np.zeros((scoring.MAX_REQUEST_IMAGES + 1, 1, 8, 8), np.uint8), config)
    answer = scoring.score(flow, "density", images, config)  # two chunks: every image scored, finite
    assert answer["bits_per_dim"].shape == (len(images),) and np.isfinite(answer["bits_per_dim"]).all()
    alone = scoring.score(flow, "density", images[:3], config)["bits_per_dim"]  # the first chunk's draws
    assert np.allclose(answer["bits_per_dim"][:3], alone, atol=0.5)


def test_serving_scores_under_its_thread_budget_and_gives_the_process_its_own_back(monkeypatch):
    import numpy as np
    import torch

    import pipeline.models.scoring
    from experiments.pyfunc_model import IResNetPyfuncModel
    from pipeline.training.device import usable_cores

    seen = []
    monkeypatch.setattr(
        pipeline.models.scoring, "score", lambda *a: seen.append(torch.get_num_threads()) or {"p": np.zeros(1)}
    )
    served = IResNetPyfuncModel()
    served.model, served.config = None, {"kind": "classify"}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a server process's own setting: more than its budget
    monkeypatch.setenv("IRESNET_SERVING_THREADS", "1")
    served.predict(None, np.zeros((1, 1, 2, 2), np.uint8))
    monkeypatch.delenv("IRESNET_SERVING_THREADS")
    monkeypatch.setenv("MLFLOW_MODELS_WORKERS", str(usable_cores()))  # one core per server worker
    served.predict(None, np.zeros((1, 1, 2, 2), np.uint8))
    assert seen == [1, 1] and torch.get_num_threads() == 2
    torch.set_num_threads(before)
