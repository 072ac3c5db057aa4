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


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_resumes_on_its_device_with_host_rng_and_host_step_counters(tmp_path, device):
    """The file is read onto the CPU and load_state_dict places the tensors: the RNG states stay the host byte tensors
    torch.set_rng_state takes (a map_location=cuda load made every GPU resume fail), the optimizer's step counters
    stay on the host (on a GPU they would cost a read per step), and only this process's GPU's RNG is saved."""
    from pipeline.training.checkpoint import rng_state
    from pipeline.training.loop import restore

    def build():
        torch.manual_seed(0)
        model = nn.Linear(3, 1).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, optimizer = build()
    config = LoopConfig(epochs=2, checkpoint_path=tmp_path / "last.pt", progress=False)
    x = torch.randn(8, 3, device=device)
    fit(model, optimizer, None, lambda epoch: [(x,)] * 3, lambda batch: (model(batch[0]).pow(2).mean(), {}), config)
    fresh, fresh_optimizer = build()
    state, checkpoint = restore(tmp_path / "last.pt", fresh, fresh_optimizer, None)
    assert (state.epoch, state.step) == (2, 6)
    assert checkpoint["rng"]["torch"].device.type == "cpu" and checkpoint["rng"]["torch"].dtype == torch.uint8
    assert "cuda" not in rng_state()  # every visible GPU's state made a resume with fewer GPUs fail
    steps = [s["step"] for s in fresh_optimizer.state.values()]
    assert steps and all(step.device.type == "cpu" for step in steps)
    assert all(p.device.type == device for p in fresh.parameters())
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
