"""The benchmark scripts run, measure what they say, and check the issue's ratios (tiny sizes; no timing asserted)."""

import math

import pytest

from benchmarks import inverse, peers, presets, quality, step_time, workers


class _Queue(list):
    put = list.append


def test_step_time_targets_are_ratios_of_this_runs_cases():
    results = [
        {"case": c.name, "seconds_per_step": 1.0 + i, "memory_above_start_mib": 10.0 * (i + 1)}
        for i, c in enumerate(step_time.CASES)
    ]
    by_name = {r["case"]: r for r in results}
    rows = {t["ratio"]: t for t in step_time.check_targets(results)}
    memory = rows["memory, Neumann / backprop (5 terms)"]
    expected = (
        by_name["(c) flow, 5 terms, Neumann"]["memory_above_start_mib"]
        / by_name["(c) flow, 5 terms, backprop"]["memory_above_start_mib"]
    )
    assert memory["value"] == pytest.approx(expected) and memory["met"] == (expected <= 0.5)
    assert "met" in step_time.format_table(
        [
            r | {"images_per_second": 1.0, "time_ratio": 1.0, "peak_memory_mib": 1.0, "memory_ratio": 1.0}
            for r in results
        ],
        list(rows.values()),
    )


def test_step_time_times_each_model_fresh_and_after_training():
    args = dict(
        device="cpu",
        image=[1, 8, 8],
        blocks=[1, 1],
        hidden=[4, 4],
        batch=4,
        power_iterations=1,
        warmup=1,
        steps=2,
        threads=0,
        train_steps=3,
        flush=False,
        sync_steps=5,
    )
    queue = _Queue()
    case = next(c for c in step_time.CASES if c.name == "(b) i-ResNet classifier")
    step_time._measure(case, args, queue)
    (result,) = queue
    assert result["seconds_per_step"] > 0 and result["seconds_per_step_trained"] > 0
    # through fit: the non-finite check every step, and one read of the metrics every log_every (10) steps
    assert 1.0 <= result["host_syncs_per_step"] <= 1.2 and math.isnan(result["cuda_syncs_per_step"])
    rows = {t["ratio"]: t for t in step_time.check_targets([result | {"case": c.name} for c in step_time.CASES])}
    trained = rows["trained / fresh i-ResNet classifier step"]
    assert trained["value"] == pytest.approx(result["seconds_per_step_trained"] / result["seconds_per_step"])


@pytest.mark.parametrize("model", ["flow", "worst-case"])
def test_inverse_benchmark_reaches_its_target_error_with_both_methods(model):
    args = dict(
        device="cpu",
        dtype="float64",
        model=model,
        dim=16,
        coeffs=[0.9],
        image=[1, 8, 8],
        blocks=[1, 1],
        hidden=8,
        batch=4,
        target_error=1e-6,
        json=None,
    )
    rows = inverse.run(args)
    assert [r["method"] for r in rows] == ["plain", "anderson"]
    assert all(r["met_target"] and r["relative_error"] <= 1e-6 and r["g_evaluations"] > 0 for r in rows)
    assert "anderson" in inverse.format_table(rows)


def test_each_peer_row_trains_and_is_checked_against_the_exact_logdet():
    args = dict(
        device="cpu",
        dataset="8gaussians",
        blocks=2,
        width=16,
        coeff=0.9,
        power_iterations=2,
        terms=5,
        steps=6,
        warmup=2,
        batch=64,
        lr=1e-3,
        n_test=100,
        seed=0,
    )
    rows = {}
    for index, (name, _) in enumerate(peers.ROWS):
        queue = _Queue()
        peers._measure(index, args, queue)
        rows[name] = queue[0]
    assert not [r for r in rows.values() if "error" in r]  # both peers installed and running
    exact = rows["ours: ELU, exact"]
    assert abs(exact["logdet_mean_abs_error"]) < 1e-5  # our exact estimator agrees with the harness
    assert exact["inverse_max_abs_error"] < 1e-4
    assert rows["FrEIA IResNetLayer: ELU, series"]["logdet_gradient"] is False
    assert all(r["test_nll"] > 0 for r in rows.values())
    # the step times: every row's steps in turn in one process, one median per row
    queue = _Queue()
    peers._time_interleaved(list(range(len(peers.ROWS))), args, queue)
    assert "error" not in queue[0] and len(queue[0]["seconds_per_step"]) == len(peers.ROWS)
    assert all(t > 0 for t in queue[0]["seconds_per_step"])
    for row, seconds in zip(rows.values(), queue[0]["seconds_per_step"], strict=True):
        row.update(seconds_per_step=seconds, clock=queue[0]["clock"])
    table = peers.format_table(list(rows.values()))
    assert "normflows" in table and queue[0]["clock"] in table


@pytest.mark.parametrize("name", ["iresnet", "glow"])
def test_quality_trains_for_its_cpu_budget_and_scores_honestly(name, tmp_path):
    from PIL import Image

    args = dict(seed=0, batch_size=16, test_images=50, samples_dir=str(tmp_path))
    # both with the logit transform first, so the brute-force check covers it in each library
    ours = {"n_blocks": (1, 1), "hidden_channels": 8, "n_power_iterations": 2, "split_prior": "conditional"}
    settings = {**(ours if name == "iresnet" else {"blocks": 1, "hidden": 8}), "logit_alpha": 1e-6}
    row = quality._train_and_score(name, settings, args, budget=1.0)
    assert row["train_cpu_s"] >= 1.0 and row["steps"] >= 1
    assert row["logdet_check_error_nats"] < 1e-2  # the library's log-det against the full Jacobian
    assert 0 < row["bpd"] < 12 and row["converged"]
    if name == "iresnet":
        assert row["estimator"] in ("russian_roulette", "power_series") and row["se"] < 2e-3
    table = quality.format_table([row], [1.0])
    assert f"{row['bpd']:9.3f}" in table and "did not reach" not in table
    assert Image.open(row["samples"]).size == (8 * 29 + 1, 8 * 29 + 1)  # 64 samples of 28x28, 1-pixel padding


def test_a_worker_trains_the_quick_flow_under_the_thread_budget(monkeypatch):
    """One worker's work, in-process (a process per worker is what the benchmark adds around it)."""
    import torch

    monkeypatch.setenv("IRESNET_LOCAL_WORKERS", "64")  # more workers than cores: one thread each
    threads = torch.get_num_threads()
    try:
        result = workers.worker(steps=2, threads=0)
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1 and result["images"] == 2 * 32 and result["cpu_seconds"] > 0
    row = {"workers": 1, "threads": "budget", "threads_per_worker": 1, "images_per_second": 64 / result["seconds"],
           "cpu_seconds_per_image": result["cpu_seconds"] / 64, "fraction_of_linear": 1.0}  # fmt: skip
    assert "1.00" in workers.format_table([row], cores=2)


def _dies(code: int, queue) -> None:
    import os

    os._exit(code)


def _hangs(seconds: float, queue) -> None:
    import time

    time.sleep(seconds)


def test_a_case_whose_process_dies_is_reported_with_its_exit_code():
    from benchmarks.common import CaseFailed, in_fresh_process

    with pytest.raises(CaseFailed, match="ended with exit code 3 before reporting a result"):
        in_fresh_process(_dies, 3)
    with pytest.raises(CaseFailed, match="no result within 1 s"):
        in_fresh_process(_hangs, 60.0, timeout_s=1.0)


@pytest.mark.parametrize("case", ["density:quick", "classify:quick"])
def test_a_preset_trains_through_its_entry_points_task_and_projects_its_schedule(case):
    args = dict(device="cpu", amp=False, steps=2, batch_size=8, threads=0, data_dir=None)
    row = presets.measure_case(case, args)
    assert row["case"] == case and row["batch_size"] == 8 and row["steps_timed"] == 2
    assert row["images_per_second"] > 0 and math.isfinite(row["train_loss"])
    assert row["seconds_per_step"] == pytest.approx(8 / row["images_per_second"])
    n_train = presets.DATASET_SHAPES["digits-mnist5k"][2]  # the quick presets' data: a full epoch is 4,000 images
    assert row["full_epoch_minutes"] == pytest.approx(n_train / row["images_per_second"] / 60)
    assert row["schedule_hours"] == pytest.approx(row["full_epoch_minutes"] * row["schedule_epochs"] / 60)
    assert math.isnan(row["gpu_peak_memory_mib"])  # CUDA's peak only; none on a CPU
    assert "density" not in case or row["estimator"] == "russian_roulette"  # the preset's own estimator
    assert case in presets.format_table([row])


def test_a_preset_case_names_an_entry_point_and_one_of_its_presets():
    assert presets.parse_case("classify:paper-cifar100") == ("classify", "paper-cifar100")
    with pytest.raises(ValueError, match="ENTRY:PRESET"):
        presets.parse_case("toy:quick")
    with pytest.raises(ValueError, match="no preset 'paper-svhn'"):
        presets.parse_case("density:paper-svhn")
    data = presets.random_dataset("cifar100", 5)
    assert data.shape == (3, 32, 32) and len(data.train) == 5 and int(data.train.labels.max()) < 100
