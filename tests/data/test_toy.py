import pytest
import torch

from pipeline.data.toy import TOY_DATASETS, sample_toy


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_generators_are_seeded_2d_and_bounded(name):
    a, b = sample_toy(name, 500, seed=3), sample_toy(name, 500, seed=3)
    assert a.shape == (500, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, sample_toy(name, 500, seed=4))
    assert a.abs().max() < 6 and a.std(dim=0).min() > 0.3


def test_unknown_toy_dataset():
    with pytest.raises(ValueError, match="unknown toy dataset"):
        sample_toy("donut", 10, seed=0)
