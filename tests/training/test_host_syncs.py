"""At most one host-device sync per training step (the non-finite check), counted on CPU.

Every way the project's code reads a tensor's value (``item``, ``bool``, ``float``, ``int``, ``tolist``,
``numpy``) is counted while ``fit`` trains the flow and the classifier; on a GPU each is a stall of the
pipeline. Reads inside PyTorch are not counted (the optimizers' step counters live on the CPU).
"""

import pytest
import torch
import torch.nn.functional as F

from experiments.tracking import PROJECT_ROOT
from pipeline.metrics import bits_per_dim
from pipeline.models import FlowArchitecture, IResNetFlow, iresnet_classifier
from pipeline.training.host_syncs import counting_value_reads
from pipeline.training.loop import LoopConfig, fit
from pipeline.transforms import PowerSeriesLogDet

PROJECT_CODE = (str(PROJECT_ROOT / "pipeline"), str(PROJECT_ROOT / "experiments"))

STEPS = 20
PER_EPOCH = 6  # epoch end: the epoch's metrics, the non-finite state check, the first and last step's logs


def _flow_step():
    model = IResNetFlow(
        FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(2, 2), hidden_channels=8, n_power_iterations=2),
        estimator=PowerSeriesLogDet(n_terms=2, gradient="neumann"),
    )
    x = torch.rand(16, 1, 8, 8) - 0.5
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent initialisation (reads the data once, before training)

    def step(batch):
        zs, logdet = model(batch[0])
        bpd = bits_per_dim(model.prior_log_prob(zs) + logdet, model.dim).mean()
        return bpd, {"bpd": bpd.detach(), "logdet": logdet.detach().mean()}

    return model, step, x


def _classifier_step():
    model = iresnet_classifier("quick", n_blocks=(1, 1, 1), hidden_channels=(8, 8, 8), input_shape=(1, 8, 8))
    x = torch.rand(16, 1, 8, 8)
    labels = torch.randint(10, (16,))
    with torch.no_grad():
        model(x)

    def step(batch):
        logits = model(batch[0])
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=1) == labels).float().mean().detach()}

    return model, step, x


@pytest.mark.parametrize("build", [_flow_step, _classifier_step], ids=["flow", "classifier"])
def test_a_training_step_reads_the_device_at_most_once(tmp_path, build):
    torch.manual_seed(0)
    model, step, x = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    config = LoopConfig(epochs=1, checkpoint_path=tmp_path / "last.pt", log_every=STEPS, progress=False, grad_clip=10.0)
    with counting_value_reads(PROJECT_CODE) as counts:
        fit(model, optimizer, None, lambda epoch: [(x,)] * STEPS, step, config)
    assert counts["n"] <= STEPS + PER_EPOCH, f"{counts['n']} reads in {STEPS} steps"
