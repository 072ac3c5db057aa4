"""The CUDA path end to end (skipped without a GPU): a resumed run equals an uninterrupted one on the device.

CPU tests check each invariant these rest on (host RNG states and step counters, no device asserts, syncs counted
at the dispatcher); these run them where a device exists.
"""

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments import density
from tests.experiments.conftest import SimulatedCrash, assert_same_final_parameters, runs_of
from tests.experiments.test_density import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_gpu_run_resumed_after_a_crash_equals_an_uninterrupted_one(store, crash_after_epoch):
    cfg = density.config_from_preset(
        "quick",
        **{**TINY, "epochs": 3, "eval_every": 0},
        device="cuda",
        deterministic=True,
        checkpoint_dir=str(store / "ckpt"),
    )
    straight = density.run(cfg)
    crash_after_epoch(2)
    with pytest.raises(SimulatedCrash):
        density.run(cfg)
    crashed = next(r.info.run_id for r in runs_of("density") if r.info.run_id != straight)
    resumed = density.run(density.config_for_resume(crashed, checkpoint_dir=str(store / "ckpt")))
    assert MlflowClient().get_run(resumed).info.status == "FINISHED"
    assert_same_final_parameters(store / "ckpt", straight, resumed)
