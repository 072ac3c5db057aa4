import math

import pytest

from pipeline.training.schedule import cosine_factor, warmup_then


def test_cosine_warms_up_then_decays_to_its_floor():
    factor = warmup_then("cosine", warmup_steps=10, total_steps=100, final_fraction=0.1)
    assert factor(0) == pytest.approx(0.1 * cosine_factor(0.0, 0.1))
    assert factor(9) == pytest.approx(cosine_factor(0.09, 0.1))
    assert factor(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert factor(100) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)
    values = [factor(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone after warm-up


def test_constant_is_the_warm_up_alone():
    factor = warmup_then("constant", warmup_steps=4, total_steps=0)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kw,message", [(dict(schedule="step"), "unknown lr schedule"),
                                         (dict(final_fraction=1.5), "final_fraction")])  # fmt: skip
def test_bad_schedules_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        warmup_then(**{"schedule": "cosine", "warmup_steps": 0, "total_steps": 10, **kw})
