import pytest
import torch
from torch import nn

from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.loop import LoopConfig, NonFiniteLossError, fit


class Explodes(nn.Module):
    """One weight; from step ``blow_up_at`` on, the loss is finite (~1e30) but its update overflows float32."""

    def __init__(self, blow_up_at: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.blow_up_at = blow_up_at
        self.steps = 0

    def loss(self) -> torch.Tensor:
        self.steps += 1
        if self.steps < self.blow_up_at:
            return (self.w * 0.0).sum()  # zero, with a zero gradient: w stays 1
        return (self.w * 1e30).sum()  # 3e30: finite; gradient 1e30 times lr 1e10 overflows


def _fit(tmp_path, model: Explodes, epochs: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e10)
    config = LoopConfig(epochs=epochs, checkpoint_path=tmp_path / "last.pt", progress=False)
    fit(model, optimizer, None, lambda epoch: [(torch.zeros(1),)], lambda batch: (model.loss(), {}), config)


def test_a_finite_loss_whose_update_overflows_is_never_checkpointed(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*last good checkpoint \(epoch 1\)"):
        _fit(tmp_path, Explodes(blow_up_at=2), epochs=3)
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    assert torch.isfinite(kept["model"]["w"]).all()


def test_a_failure_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        _fit(tmp_path, Explodes(blow_up_at=1), epochs=2)
    assert not (tmp_path / "last.pt").exists()
