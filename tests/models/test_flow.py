import pytest
import torch

from pipeline.bounds import flow_bias_bound_bits_per_dim
from pipeline.metrics import bits_per_dim
from pipeline.models import FlowArchitecture, IResNetFlow, iresnet_flow
from pipeline.transforms import ExactLogDet, FixedPointConfig, InverseReport, PowerSeriesLogDet, SplitPriorCoupling
from pipeline.transforms.coupling import InvertibleLinear
from tests.transforms.helpers import dense_jacobians


def _tiny_flow(shape, n_blocks=(2, 2), **options):
    arch = FlowArchitecture(input_shape=shape, n_blocks=n_blocks, hidden_channels=8, n_power_iterations=5, **options)
    flow = IResNetFlow(
        arch, estimator=ExactLogDet(), inverse_config=FixedPointConfig(atol=1e-12, rtol=1e-12, max_iterations=500)
    )
    x = torch.rand(8, *shape) - 0.5
    for _ in range(5):  # initialise ActNorm on data and settle the spectral estimates
        flow(x)
    with torch.no_grad():  # move the learned priors away from N(0, I) so they are tested too
        for prior in flow.priors:
            prior.mean.normal_(0, 0.3)
            prior.log_std.normal_(0, 0.3)
        for split in (m for m in flow.modules() if isinstance(m, SplitPriorCoupling)):  # and off the identity
            split.net.weight.normal_(0, 0.3)
        for mixing in (m for m in flow.modules() if isinstance(m, InvertibleLinear)):  # and |det W| != 1
            mixing.log_abs_diag.normal_(0, 0.3)
    return flow.eval(), x[:3]


# the logit transform and fully connected end blocks (Residual Flows) and the conditional split prior (Glow) are
# part of the map checked
SHAPES_AND_OPTIONS = [
    ((1, 4, 4), {}),
    ((3, 4, 4), {}),
    ((1, 4, 4), {"logit_alpha": 1e-6, "split_prior": "conditional"}),
    ((3, 4, 4), {"logit_alpha": 0.05, "fc_blocks": 2, "fc_hidden": 8}),
    ((1, 4, 4), {"invertible_1x1": True, "split_prior": "conditional"}),
    # the paper's code's blocks: an activation on every block's input but the first, its squeeze's channel order
    ((3, 4, 4), {"input_activation": True, "squeeze_order": "position_major", "fc_blocks": 1, "fc_hidden": 8}),
]


@pytest.mark.parametrize(("shape", "options"), SHAPES_AND_OPTIONS)
def test_flow_logdet_equals_brute_force_jacobian_of_the_whole_model(float64, shape, options):
    flow, x = _tiny_flow(shape, **options)

    def encode(v):
        zs, _ = flow(v)
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    jac = dense_jacobians(encode, x)
    assert jac.shape[1:] == (x[0].numel(), x[0].numel())
    _, logdet = flow(x)
    assert torch.allclose(logdet, torch.linalg.slogdet(jac).logabsdet, atol=1e-9)
    # log p(x) = sum of prior log-densities + log-det, checked against an explicit Gaussian
    zs, _ = flow(x)
    manual = sum(
        torch.distributions.Normal(p.mean, p.log_std.exp()).log_prob(z).flatten(1).sum(1)
        for p, z in zip(flow.priors, zs, strict=True)
    )
    assert torch.allclose(flow.log_prob(x), manual + logdet)


@pytest.mark.parametrize(("shape", "options"), SHAPES_AND_OPTIONS)
def test_flow_inverse_of_forward_is_identity(float64, shape, options):
    flow, x = _tiny_flow(shape, **options)
    zs, _ = flow(x)
    report = InverseReport()
    x_rec = flow.inverse(zs, report=report)
    assert report.converged and len(report.iterations) == len(flow.residual_blocks()) >= 4
    assert ((x_rec - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).max() < 1e-8


def test_power_series_log_prob_is_close_to_exact(float64):
    flow, x = _tiny_flow((1, 4, 4))
    exact = flow.log_prob(x)
    x_many = x[:1].expand(2000, -1, -1, -1)
    with flow.estimator(PowerSeriesLogDet(n_terms=20)):
        approx = flow.log_prob(x_many).mean().item()
    assert approx == pytest.approx(exact[0].item(), abs=0.05)


def test_sampling_shapes_and_temperature(float64):
    flow, _ = _tiny_flow((1, 4, 4))
    samples = flow.sample(5, temperature=0.7)
    assert samples.shape == (5, 1, 4, 4) and torch.isfinite(samples).all()
    # temperature 0: the decoded prior means, the same for every draw
    cold = flow.sample(3, temperature=0.0)
    assert torch.allclose(cold[0], cold[1]) and torch.allclose(cold[1], cold[2])


def test_one_optimisation_step_lowers_the_nll(float64):
    arch = FlowArchitecture(input_shape=(1, 4, 4), n_blocks=(2, 2), hidden_channels=8, n_power_iterations=1)
    flow = IResNetFlow(arch, estimator=PowerSeriesLogDet(n_terms=5))
    x = (torch.rand(32, 1, 4, 4) - 0.5) * 0.3 + 0.1
    flow(x)  # ActNorm init

    def nll():
        flow.eval()
        with torch.no_grad(), flow.estimator(ExactLogDet()):
            value = -flow.log_prob(x).mean().item()
        flow.train()
        return value

    before = nll()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    loss = -flow.log_prob(x).mean()
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert nll() < before


def test_bias_bound_and_bits_per_dim(float64):
    flow, x = _tiny_flow((1, 4, 4))
    lips = flow.lipschitz_bounds()
    assert len(lips) == 4 and all(0 < lip < 1 for lip in lips)
    # the power-iteration estimate can only under-state the certified bound (sigma~ <= sigma)
    estimates = flow.lipschitz_bounds(method="estimate")
    assert all(e <= 0.9**3 + 1e-12 and e <= lip * (1 + 1e-9) for e, lip in zip(estimates, lips, strict=True))
    dims = flow.block_dims()
    assert dims == [16, 16, 8, 8]
    assert flow_bias_bound_bits_per_dim(lips, dims, 10, 16) < flow_bias_bound_bits_per_dim(lips, dims, 2, 16)
    lp = flow.log_prob(x)
    assert torch.allclose(bits_per_dim(lp, 16, 256), -lp / (16 * torch.log(torch.tensor(2.0))) + 8)
    assert torch.allclose(flow.bits_per_dim(x, n_levels=256), bits_per_dim(lp, 16, 256))


def test_architecture_is_validated():
    with pytest.raises(ValueError, match="cannot be squeezed"):
        FlowArchitecture(input_shape=(1, 28, 28), n_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="0 < c < 1"):
        FlowArchitecture(coeff=1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        FlowArchitecture(activation="tanh")
    with pytest.raises(ValueError, match="logit_alpha"):
        FlowArchitecture(logit_alpha=0.5)
    with pytest.raises(ValueError, match="fc_blocks must be"):
        FlowArchitecture(fc_blocks=-1)
    with pytest.raises(ValueError, match="unknown split_prior"):
        FlowArchitecture(split_prior="learned")
    with pytest.raises(ValueError, match="unknown flow preset"):
        iresnet_flow("imagenet")
    with pytest.raises(ValueError, match="expects inputs of shape"):
        iresnet_flow("quick")(torch.randn(2, 1, 32, 32))


def test_hidden_widths_per_level():
    flow = IResNetFlow(FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(1, 1), hidden_channels=(8, 16)))
    widths = [b.branch[0].out_channels for b in flow.residual_blocks()]
    assert widths == [8, 16]
    assert FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(1, 1), hidden_channels=(4,)).hidden_channels == (4, 4)
    with pytest.raises(ValueError, match="one per level"):
        FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(1, 1), hidden_channels=(4, 4, 4))


def test_presets_build():
    flow = iresnet_flow("quick")
    assert flow.arch.n_blocks == (6, 6)
    assert iresnet_flow("mnist", n_blocks=(1, 1, 1)).input_shape == (1, 32, 32)


def test_variance_report_measures_each_blocks_estimator_spread(float64):
    from pipeline.diagnostics import logdet_variance_report, total_logdet_std_bits_per_dim
    from pipeline.transforms import RussianRouletteLogDet

    # without ActNorm (and the logit transform, the split prior, the fully connected end) the residual blocks carry
    # the whole log-det, so their means must add up to it
    flow = iresnet_flow(
        "quick", input_shape=(1, 4, 4), n_blocks=(2, 1), hidden_channels=4, actnorm=False, logit_alpha=0.0,
        split_prior="unconditional", fc_blocks=0,
    ).eval()  # fmt: skip
    x = torch.rand(3, 1, 4, 4) - 0.5
    exact_rows = logdet_variance_report(flow, x, ExactLogDet(), n_repeats=3)
    assert len(exact_rows) == 3 and all(r["std_nats"] == 0 for r in exact_rows)  # deterministic: no spread
    with torch.no_grad(), flow.estimator(ExactLogDet()):
        _, logdet = flow(x)
    assert sum(r["mean_logdet_nats"] for r in exact_rows) == pytest.approx(float(logdet.mean()), rel=1e-10)
    rows = logdet_variance_report(flow, x, RussianRouletteLogDet(), n_repeats=40)
    assert all(r["std_nats"] > 0 for r in rows) and rows[0]["expected_vjps"] == 4
    # more probes, less spread (variance ~ 1/probes)
    one = total_logdet_std_bits_per_dim(logdet_variance_report(flow, x, PowerSeriesLogDet(n_terms=3), n_repeats=60))
    many = total_logdet_std_bits_per_dim(
        logdet_variance_report(flow, x, PowerSeriesLogDet(n_terms=3, n_probes=16), n_repeats=60)
    )
    assert many < one / 2


def test_the_estimator_is_chosen_per_model_and_swapped_with_a_context(float64):
    arch = FlowArchitecture(input_shape=(1, 4, 4), n_blocks=(2, 1), hidden_channels=4)
    flow = IResNetFlow(arch, estimator=PowerSeriesLogDet(n_terms=1))
    assert flow.block_dims() == [16, 16, 8]  # known at construction from level_shapes(), before any call
    x = torch.rand(3, 1, 4, 4) - 0.5
    flow(x)  # ActNorm's initialisation
    flow.eval()
    blocks = flow.residual_blocks()
    with torch.no_grad():
        torch.manual_seed(5)  # the series draws a Hutchinson probe
        one_term = flow(x)[1]
        with flow.estimator(ExactLogDet()):
            assert all(isinstance(b.estimator, ExactLogDet) for b in blocks)
            exact = flow(x)[1]
        torch.manual_seed(5)
        assert torch.equal(flow(x)[1], one_term)  # the blocks' own estimator is back
    jacobians = dense_jacobians(lambda v: torch.cat([z.flatten(1) for z in flow(v)[0]], dim=1), x)
    assert torch.allclose(exact, torch.linalg.slogdet(jacobians)[1], atol=1e-10)
    with pytest.raises(RuntimeError, match="inside"), flow.estimator(ExactLogDet()):
        raise RuntimeError("inside")
    assert all(isinstance(b.estimator, PowerSeriesLogDet) for b in blocks)  # restored on an error too


def test_half_precision_input_is_computed_in_the_models_precision():
    """The model's boundary casts its input: float16 data gives what the same values in float32 give."""
    flow, x = _tiny_flow((1, 4, 4), logit_alpha=1e-6)
    x16 = x.half()
    assert torch.equal(flow.log_prob(x16), flow.log_prob(x16.float()))
    zs, _ = flow(x16.float())
    assert torch.equal(flow.inverse([z.half() for z in zs]), flow.inverse([z.half().float() for z in zs]))
    with pytest.raises(TypeError, match="expects floating-point data"):
        flow(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


def test_the_input_activation_is_on_every_block_but_the_flows_first():
    from pipeline.layers.activations import ACTIVATIONS
    from pipeline.transforms.residual import InvertibleResidualBlock

    flow = IResNetFlow(
        FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(2, 2), hidden_channels=4, input_activation=True, fc_blocks=1)
    )
    blocks = [m for m in flow.modules() if isinstance(m, InvertibleResidualBlock)]
    first_layers = [type(block.branch[0]) for block in blocks]
    activation = type(ACTIVATIONS["elu"]())
    assert first_layers[0] is not activation and first_layers[1:] == [activation] * 4
    plain = IResNetFlow(FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(2, 2), hidden_channels=4))
    assert not any(type(m.branch[0]) is activation for m in plain.modules() if isinstance(m, InvertibleResidualBlock))
