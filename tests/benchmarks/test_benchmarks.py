"""The benchmark scripts run, measure what they say, and check the issue's ratios (tiny sizes; no timing asserted)."""

import json
import math
import re

import pytest
import torch

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


QUALITY_ARGS = dict(
    dataset="digits-mnist5k", data_dir=None, train_images=4000, validation_images=500, test_images=60, budget=1.0,
    batch_size=16, grid="single", jobs=1, seeds=2, samples_dir=None,
    # both with the logit transform first, so the brute-force check covers it in each library
    ours={"n_blocks": (1, 1), "hidden_channels": 8, "n_power_iterations": 2, "split_prior": "conditional",
          "logit_alpha": 1e-6},
    peers={"blocks": 1, "hidden": 8, "logit_alpha": 1e-6},
)  # fmt: skip


@pytest.mark.parametrize("name", ["iresnet", "glow"])
def test_quality_trains_for_its_cpu_budget_and_scores_validation_then_test_once(name, tmp_path):
    from PIL import Image

    args = {**QUALITY_ARGS, "samples_dir": str(tmp_path)}
    tuned = quality._train_and_score(quality.Job("tune", name, 0, 1.0, 0), args)
    assert tuned["train_cpu_s"] >= 1.0 and tuned["steps"] >= 1
    assert tuned["logdet_check_error_nats"] < 1e-2  # the library's log-det against the full Jacobian
    assert 0 < tuned["validation"]["bpd"] < 12 and tuned["validation"]["converged"]
    assert "test" not in tuned and "samples" not in tuned  # tuning never looks at the test images
    # the step's arithmetic per image, and the rate the budget ran it at
    assert tuned["train_mflop_per_image"] > 0
    images = tuned["steps"] * (16 if name == "glow" else quality.IRESNET_START["batch_size"])
    assert tuned["train_gflop_per_s"] == pytest.approx(
        tuned["train_mflop_per_image"] * images / tuned["train_cpu_s"] / 1e3
    )
    if name == "glow":  # exact log-det, no random terms: the count per image does not depend on the batch
        train = quality.splits(QUALITY_ARGS)[0]
        train_x = quality.dequantize(train.images[:64], 256)
        contender = quality._normflows("glow", args["peers"], train_x, {"progress": 0.0})
        gen = torch.Generator().manual_seed(0)
        per_image = [quality._training_flops_per_image(contender, train, b, gen, batches=1) for b in (4, 8)]
        assert per_image[0] == pytest.approx(per_image[1], rel=1e-2)
        assert all(p.grad is None for p in contender.model.parameters())  # the count leaves no gradients behind
    final = quality._train_and_score(quality.Job("final", name, 0, 1.0, 1), {**args, "ema": 0.9})  # averaged
    assert 0 < final["test"]["bpd"] < 12 and final["seed"] == 1
    if name == "iresnet":
        assert final["test"]["estimator"] in ("russian_roulette", "power_series") and final["test"]["se"] < 2e-3
    assert Image.open(final["samples"]).size == (8 * 29 + 1, 8 * 29 + 1)  # 64 samples of 28x28, 1-pixel padding


def test_the_parameter_average_is_the_warmed_up_moving_average_and_keeps_the_lipschitz_guarantee():
    from pipeline.layers.spectral import SpectralConfig, SpectralNormLinear

    torch.manual_seed(0)
    layer = SpectralNormLinear(6, 5, SpectralConfig(coeff=0.9))
    average = quality.ParameterAverage(layer, 0.95)
    expected = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.3)
    for t in range(1, 31):
        optimizer.zero_grad()
        (-(layer(torch.randn(8, 6)) ** 2).sum()).backward()  # push the norm up
        optimizer.step()
        average.update()
        decay = min(0.95, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * layer.weight.detach()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 6))  # the evaluation norm of the last weights, cached
        assert not torch.allclose(layer.weight, expected)
        average.apply()
        assert torch.allclose(layer.weight, expected, atol=1e-6)
        applied = (layer(torch.eye(6)) - layer.bias).T  # the weight the layer applies, by brute force
    sigma = torch.linalg.matrix_norm(expected, 2)
    assert sigma > 0.9  # the average needs normalising, so the check below is not vacuous
    assert torch.allclose(applied, expected * 0.9 / sigma, atol=1e-5)  # normalised anew, to c
    with pytest.raises(ValueError, match="decay"):
        quality.ParameterAverage(layer, 1.0)


def test_quality_splits_hold_validation_out_of_train_and_subset_a_larger_dataset():
    train, validation, test = quality.splits(QUALITY_ARGS)
    assert (len(train), len(validation), len(test)) == (3500, 500, 60)
    seen = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in seen for x in validation.images[:50])  # held out, not shared
    again = quality.splits(QUALITY_ARGS)
    assert torch.equal(again[1].images, validation.images)  # the same for every contender and seed
    assert {len(grid) for grid in quality.GRIDS.values()} == {8}  # the same tuning effort for each


def test_quality_chooses_on_validation_and_pairs_seeds_against_the_best_peer():
    def row(phase, name, config, seed, val, test=None):
        r = {"phase": phase, "contender": name, "config": config, "multiple": 1.0, "seed": seed, "key": "",
             "validation": {"bpd": val}}  # fmt: skip
        return r | ({"test": {"bpd": test}} if test is not None else {})

    rows = [row("tune", "iresnet", 0, 0, 1.50), row("tune", "iresnet", 1, 0, 1.40), row("tune", "glow", 0, 0, 1.45),
            row("tune", "glow", 1, 0, 1.46), row("tune", "realnvp", 0, 0, 1.6)]  # fmt: skip
    diverged = {"phase": "tune", "contender": "realnvp", "config": 1, "multiple": 1.0, "seed": 0, "key": "d",
                "error": "FloatingPointError: non-finite training loss at step 4"}  # fmt: skip
    assert quality._diverged(diverged) and not quality._diverged({"error": "RuntimeError: killed"})
    chosen = quality.choose([*rows, diverged], ["iresnet", "glow", "realnvp"], [1.0])  # never chosen, kept on resume
    assert chosen == {("iresnet", 1.0): 1, ("glow", 1.0): 0, ("realnvp", 1.0): 0}
    rows += [row("final", "iresnet", 1, s, 0, t) for s, t in enumerate([1.40, 1.41, 1.39])]
    rows += [row("final", "glow", 0, s, 0, t) for s, t in enumerate([1.45, 1.47, 1.44])]
    rows += [row("final", "realnvp", 0, s, 0, t) for s, t in enumerate([1.6, 1.6, 1.6])]
    ours = next(s for s in quality.summarise(rows, chosen) if s["contender"] == "iresnet")
    assert ours["best_peer"] == "glow" and ours["paired_difference"] == pytest.approx([-0.05, -0.06, -0.05])
    assert ours["ahead_by_2sd"] and ours["mean"] == pytest.approx(1.40)
    args = {**QUALITY_ARGS, "grid": "full"}
    for row in rows:
        row["steps"] = 10
    markdown = quality.format_markdown(rows, quality.summarise(rows, chosen), args)
    assert "| iresnet | 0.0167 | cosine | **1.400** | 10 |" in markdown  # grid point 1, chosen: it stands out
    assert "+0.000" not in markdown and "-0.053 ± 0.006 vs glow (ahead by > 2 sd)" in markdown
    # --seeds 0, a pilot: validation only, no test row (nothing to pair) and the pilot's settings named
    tuned_only = [r for r in rows if r["phase"] == "tune"]
    assert quality.summarise(tuned_only, chosen) == []
    table = quality.format_table(tuned_only, [], {**args, "ours": {"hidden_channels": (16,)}})
    assert "i-ResNet hidden_channels=(16,)" in table and "1.400" in table
    assert "MFLOP" not in table  # rows from before the count have no cost lines
    tuned_only[0] |= {"train_mflop_per_image": 50.0, "train_gflop_per_s": 5.0}
    table = quality.format_table(tuned_only, [], args)
    assert re.search(r"\n" + tuned_only[0]["contender"] + r" +50\.0 +100\.0 +5\.00", table)  # 5 GFLOP/s / 50 MFLOP


def test_quality_stage_two_tunes_the_architecture_at_the_rate_stage_one_chose(tmp_path):
    stage_one = {"config": {"grid": "full"}, "chosen": [["glow", 1.0, 5], ["iresnet", 1.0, 2], ["glow", 2.0, 0]]}
    path = tmp_path / "stage1.json"
    path.write_text(json.dumps(stage_one))
    rates = quality.chosen_points(str(path), "full")
    assert rates == {"glow": quality.GRIDS["glow"][5], "iresnet": quality.GRIDS["iresnet"][2]}  # at 1x only
    with pytest.raises(ValueError, match="--grid full run; a --grid architecture run was expected"):
        quality.chosen_points(str(path), "architecture")
    args = {**QUALITY_ARGS, "grid": "architecture", "earlier": {"glow": rates["glow"]}, "peers": {"lr": 0.5}}
    # the earlier stage, then --peer-set, then the grid point
    settings = quality.settings_of(quality.Job("tune", "glow", 4, 1.0, 0), args)
    assert settings == {"lr": 0.5, "lr_schedule": rates["glow"]["lr_schedule"], "blocks": 8}
    assert all(grid[0] == {} for grid in quality.ARCHITECTURES.values())  # stage one's configuration comes first
    tuning = quality.tuning_jobs(["iresnet", "realnvp"], [1.0], args)
    assert [(j.contender, j.config) for j in tuning[:4]] == [
        ("iresnet", 0),
        ("realnvp", 0),
        ("iresnet", 1),
        ("realnvp", 1),
    ]
    assert len(tuning) == len(quality.ARCHITECTURES["iresnet"]) + len(quality.ARCHITECTURES["realnvp"])
    # a single configuration to test (e.g. --architecture-from another dataset): no tuning run repeats a final
    assert quality.tuning_jobs(["glow"], [1.0], {**args, "grid": "single", "seeds": 3}) == []
    assert quality.choose([], ["glow"], [1.0], {**args, "grid": "single", "seeds": 3}) == {("glow", 1.0): 0}
    assert len(quality.tuning_jobs(["glow"], [1.0], {**args, "grid": "single", "seeds": 0})) == 1  # a pilot
    rows = [{"phase": "tune", "contender": "glow", "config": c, "multiple": 1.0, "seed": 0, "key": "", "steps": 9,
             "settings": {"lr": 0.01, "lr_schedule": "cosine"}, "validation": {"bpd": v}}
            for c, v in ((0, 1.4), (4, 1.3))]  # fmt: skip
    markdown = quality.format_markdown(rows, [], args)
    assert "| glow | 0.01 | cosine | blocks=8 | 1.300 | 9 |" in markdown
    assert "| glow | 0.01 | cosine | as in stage 1 | 1.400 | 9 |" in markdown


def test_quality_stage_three_tunes_the_step_alike_on_top_of_both_earlier_stages(tmp_path):
    grids = quality.OPTIMISATION
    assert len(grids["iresnet"]) == len(grids["glow"]) == 6 and grids["iresnet"][0] == grids["glow"][0] == {}
    stage_two = {"config": {"grid": "architecture"}, "chosen": [["glow", 1.0, 4], ["iresnet", 1.0, 4]]}
    path = tmp_path / "stage2.json"
    path.write_text(json.dumps(stage_two))
    architecture = quality.chosen_points(str(path), "architecture")["glow"]
    earlier = {"glow": {"lr": 0.01, "lr_schedule": "cosine", **architecture}}
    args = {**QUALITY_ARGS, "grid": "optimisation", "earlier": earlier, "peers": {}}
    settings = quality.settings_of(quality.Job("tune", "glow", 4, 1.0, 0), args)
    assert settings == {"lr": 2e-2, "lr_schedule": "cosine", "blocks": 8, "warmup_steps": 300, "batch_size": 32}
    assert len(quality.tuning_jobs(["iresnet", "glow", "realnvp"], [1.0], args)) == 6 + 6 + 1  # others: their base
    stage_three = {"config": {"grid": "optimisation"}, "chosen": [["iresnet", 1.0, 4]]}
    path.write_text(json.dumps(stage_three))
    assert quality.chosen_points(str(path), "optimisation") == {"iresnet": grids["iresnet"][4]}
    # a peer's settings are checked by name, and its own batch size replaces --batch-size
    train_x = torch.rand(64, 1, 28, 28) - 0.5
    peer = quality._normflows("glow", {"blocks": 1, "hidden": 8, "batch_size": 8, "warmup_steps": 10}, train_x, {})
    assert peer.batch_size == 8 and peer.scheduler is not None
    assert peer.scheduler.get_last_lr()[0] == pytest.approx(1e-4)  # step 0 of a 10-step warm-up to 1e-3
    with pytest.raises(ValueError, match=r"unknown peer settings \['hiden'\]"):
        quality._normflows("glow", {"hiden": 8}, train_x, {})


def test_a_worker_trains_the_quick_flow_under_the_thread_budget(monkeypatch):
    """One worker's work, in-process (a process per worker is what the benchmark adds around it)."""
    import torch

    monkeypatch.setenv("IRESNET_LOCAL_WORKERS", "64")  # more workers than cores: one thread each
    threads = torch.get_num_threads()
    try:
        result = workers.worker(steps=2, threads=0)
    finally:
        torch.set_num_threads(threads)
    from experiments.density import PRESETS

    images = 2 * PRESETS["quick"]["batch_size"]  # two steps of the main job's batch
    assert result["threads"] == 1 and result["images"] == images and result["cpu_seconds"] > 0
    row = {"workers": 1, "threads": "budget", "threads_per_worker": 1, "images_per_second": images / result["seconds"],
           "cpu_seconds_per_image": result["cpu_seconds"] / images, "fraction_of_linear": 1.0}  # fmt: skip
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
    assert row["train_gflop_per_image"] > 0 and row["compile"] is False
    assert row["achieved_tflop_per_s"] == pytest.approx(row["train_gflop_per_image"] * row["images_per_second"] / 1e3)
    assert case in presets.format_table([row])


def test_preset_settings_are_options_with_their_types():
    assert presets.parse_settings(["gradient=backprop", "n_terms=5", "coeff=0.9", "compile=true"]) == {
        "gradient": "backprop",
        "n_terms": 5,
        "coeff": 0.9,
        "compile": True,
    }
    with pytest.raises(ValueError, match="OPTION=VALUE"):
        presets.parse_settings(["gradient"])


def test_a_setting_changes_what_the_preset_trains():
    args = dict(device="cpu", amp=False, steps=1, batch_size=4, threads=0, data_dir=None)
    row = presets.measure_case("density:quick", {**args, "set": {"estimator": "power_series", "n_terms": 2}})
    assert row["estimator"] == "power_series" and row["n_terms"] == 2 and row["set"]["n_terms"] == 2


def test_a_preset_case_names_an_entry_point_and_one_of_its_presets():
    assert presets.parse_case("classify:paper-cifar100") == ("classify", "paper-cifar100")
    with pytest.raises(ValueError, match="ENTRY:PRESET"):
        presets.parse_case("toy:quick")
    with pytest.raises(ValueError, match="no preset 'paper-svhn'"):
        presets.parse_case("density:paper-svhn")
    data = presets.random_dataset("cifar100", 5)
    assert data.shape == (3, 32, 32) and len(data.train) == 5 and int(data.train.labels.max()) < 100


def _report_peak(queue):
    import torch

    from benchmarks.common import memory_now_mib, memory_peak_mib

    memory_now_mib(torch.device("cpu"))
    small = torch.ones(16 * 2**20, dtype=torch.uint8)  # 16 MiB, touched
    queue.put({"peak_mib": memory_peak_mib(torch.device("cpu")), "sum": int(small[:10].sum())})


def test_a_fresh_processs_memory_peak_is_its_own_not_its_parents():
    """ru_maxrss of a spawned child starts at its parent's peak: the child must report its own high-water mark."""
    from benchmarks.common import in_fresh_process, memory_peak_mib

    big = torch.ones(600 * 2**20, dtype=torch.uint8)  # the parent's peak: 600 MiB more than the child needs
    parent_peak = memory_peak_mib(torch.device("cpu"))
    child = in_fresh_process(_report_peak, timeout_s=300)
    del big
    assert child["sum"] == 10 and child["peak_mib"] < parent_peak - 400
