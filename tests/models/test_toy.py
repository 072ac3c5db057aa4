import torch

from pipeline.models import vector_flow
from pipeline.transforms import FixedPointConfig
from tests.transforms.helpers import dense_jacobians


def test_vector_flow_exact_logdet_and_inverse(float64):
    flow = vector_flow("quick", n_blocks=4)
    for block in flow.residual_blocks():
        block.inverse_config = FixedPointConfig(atol=1e-12, rtol=1e-12, max_iterations=500)
    x = torch.randn(6, 2)
    flow(x)
    flow.eval()
    (z,), logdet = flow(x)
    jac = dense_jacobians(lambda v: flow(v)[0][0], x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
    assert torch.allclose(flow.inverse([z]), x, atol=1e-9)
    assert flow.sample(7).shape == (7, 2)


def test_a_vector_flow_round_trips_as_data(tmp_path):
    from pipeline.models import vector_flow
    from pipeline.models.serialization import load_model_folder, save_model

    torch.manual_seed(0)
    flow = vector_flow("quick")
    x = torch.randn(16, 2)
    with torch.no_grad():
        flow(x)  # ActNorm's initialisation
    flow.eval()
    save_model(flow, tmp_path)
    again = load_model_folder(tmp_path)
    assert type(again) is type(flow)
    assert torch.equal(again.log_prob(x), flow.log_prob(x))


def test_the_glow_baseline_round_trips_as_data(tmp_path):
    from pipeline.models import vector_flow
    from pipeline.models.glow import matched_glow
    from pipeline.models.serialization import load_model_folder, save_model

    torch.manual_seed(0)
    glow = matched_glow(vector_flow("quick"))
    x = torch.randn(16, 2)
    with torch.no_grad():
        glow(x)
    glow.eval()
    save_model(glow, tmp_path)
    again = load_model_folder(tmp_path)
    assert again.arch == glow.arch and torch.equal(again.log_prob(x), glow.log_prob(x))
