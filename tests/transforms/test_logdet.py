import dataclasses
import math

import pytest
import torch
from torch import nn

from pipeline.bounds import logdet_bounds, power_series_truncation_bound
from pipeline.layers import SpectralNormLinear
from pipeline.layers.branches import (
    branch_lipschitz_bound,
    conv_branch,
    has_closed_form_jacobian,
    has_structured_jacobian,
    mlp_branch,
    mlp_jacobian,
)
from pipeline.layers.spectral import SpectralConfig
from pipeline.transforms import (
    ExactLogDet,
    PowerSeriesLogDet,
    RussianRouletteLogDet,
    make_estimator,
    sample_probe,
)
from tests.transforms.helpers import dense_jacobians, power_series_from_dense


def _trained_like(branch, x, steps=30):
    """Converge the spectral estimates (a few training-mode forwards), then freeze them."""
    for _ in range(steps):
        branch(x)
    return branch.eval()


@pytest.fixture
def mlp(float64):
    branch = mlp_branch(4, (16, 16), spectral=SpectralConfig(coeff=0.9, n_power_iterations=5))
    with torch.no_grad():
        for p in branch.parameters():
            p.mul_(3.0)  # saturate the constraint so Lip(g) is near its bound
    x = torch.randn(3, 4)
    return _trained_like(branch, x), x


@pytest.fixture
def conv(float64):
    branch = conv_branch(2, 6, spectral=SpectralConfig(coeff=0.9, n_power_iterations=5))
    x = torch.randn(2, 2, 3, 3)
    return _trained_like(branch, x), x


def _exact(branch, x):
    jac = dense_jacobians(branch, x)
    eye = torch.eye(jac.shape[-1])
    return torch.linalg.slogdet(eye + jac).logabsdet, jac


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_exact_estimator_equals_brute_force_jacobian(name, request):
    branch, x = request.getfixturevalue(name)
    gx, logdet = ExactLogDet()(branch, x)
    reference, _ = _exact(branch, x)
    assert torch.allclose(gx, branch(x))
    assert torch.allclose(logdet, reference, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_truncation_bias_falls_with_terms_and_respects_theorem_3(name, request):
    branch, x = request.getfixturevalue(name)
    exact, jac = _exact(branch, x)
    lip = branch_lipschitz_bound(branch, input_hw=tuple(x.shape[-2:]) if x.dim() == 4 else None)
    assert lip < 1
    d = x[0].numel()
    errors = []
    for n in (1, 2, 4, 8, 16):
        err = (power_series_from_dense(jac, n) - exact).abs().max().item()
        assert err <= power_series_truncation_bound(lip, d, n) + 1e-12
        errors.append(err)
    assert errors[-1] < errors[0] / 10
    assert errors[-1] < 0.05


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_estimate_is_unbiased_for_the_truncated_series(mlp, probe):
    branch, x = mlp
    x0 = x[:1].expand(4000, -1)  # one sample, 4000 independent probes in one batch
    n_terms = 6
    _, estimates = PowerSeriesLogDet(n_terms=n_terms, probe=probe)(branch, x0)
    target = power_series_from_dense(dense_jacobians(branch, x[:1]), n_terms)
    stderr = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - target) < 4 * stderr


def test_many_probes_reach_the_exact_logdet_within_standard_errors(conv):
    branch, x = conv
    exact, _ = _exact(branch, x[:1])
    x0 = x[:1].expand(2000, -1, -1, -1)
    _, estimates = PowerSeriesLogDet(n_terms=30)(branch, x0)
    stderr = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - exact) < 4 * stderr + 1e-4


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_lemma_7_bounds_hold(name, request):
    branch, x = request.getfixturevalue(name)
    exact, _ = _exact(branch, x)
    lip = branch_lipschitz_bound(branch, input_hw=tuple(x.shape[-2:]) if x.dim() == 4 else None)
    low, high = logdet_bounds(lip, x[0].numel())
    assert ((exact >= low) & (exact <= high)).all()


def test_power_series_gradient_matches_exact_gradient_in_expectation(mlp):
    branch, x = mlp
    branch.train()  # gradients w.r.t. parameters, through the normalisation
    params = [p for p in branch.parameters() if p.requires_grad]
    x0 = x[:1]
    _, exact = ExactLogDet()(branch, x0)
    _, est = PowerSeriesLogDet(n_terms=20)(branch, x0.expand(3000, -1))

    def flat_grad(value):  # the last bias does not enter the Jacobian: its gradient is zero
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)]
        )

    flat_exact, flat_est = flat_grad(exact.sum()), flat_grad(est.mean())
    assert flat_exact.norm() > 0
    assert (flat_est - flat_exact).norm() / flat_exact.norm() < 0.1


def test_estimators_under_no_grad_return_detached_values(mlp):
    branch, x = mlp
    with torch.no_grad():
        for est in (ExactLogDet(), PowerSeriesLogDet()):
            gx, logdet = est(branch, x)
            assert not gx.requires_grad and not logdet.requires_grad


def test_exact_estimator_refuses_large_dimensions():
    branch = mlp_branch(8, (4,))
    with pytest.raises(ValueError, match="max_dim=4"):
        ExactLogDet(max_dim=4)(branch, torch.randn(2, 8))


def test_estimator_arguments_are_validated():
    with pytest.raises(ValueError, match="n_terms"):
        PowerSeriesLogDet(n_terms=0)
    with pytest.raises(ValueError, match="n_terms"):
        make_estimator("power_series", n_terms=-3)
    with pytest.raises(ValueError, match="probe"):
        PowerSeriesLogDet(probe="uniform")
    with pytest.raises(ValueError, match="unknown log-det estimator"):
        make_estimator("russian")


def test_rademacher_probe_is_plus_minus_one():
    v = sample_probe(torch.empty(1000), "rademacher")
    assert set(v.unique().tolist()) == {-1.0, 1.0}


# --- unbiased (Russian-roulette) series and the Neumann gradient -------------------------------------------
def _strong_linear_branch(d=4, radius=0.6):
    """A branch whose Jacobian is a fixed symmetric matrix with eigenvalues up to ``radius``.

    Large eigenvalues make the truncation bias of a short series obvious (so an unbiasedness test has
    power), while ``radius^2 < 1 - p`` keeps the geometric Russian roulette's variance finite.
    """
    q, _ = torch.linalg.qr(torch.randn(d, d))
    weight = q @ torch.diag(torch.linspace(0.3, 1.0, d)) @ q.t()
    layer = SpectralNormLinear(d, d, spectral=SpectralConfig(coeff=radius, n_power_iterations=5))
    with torch.no_grad():
        layer.weight.copy_(weight * 2)
    x = torch.randn(2, d)
    for _ in range(50):
        layer(x)
    return torch.nn.Sequential(layer).eval(), x


@pytest.fixture
def strong(float64):
    return _strong_linear_branch()


def _estimates(estimator, branch, x1, n_calls, batch):
    """Independent estimates at one input: every call draws its own series length, every row its own probe."""
    return torch.cat([estimator(branch, x1.expand(batch, *x1.shape[1:]))[1] for _ in range(n_calls)])


@pytest.mark.parametrize(
    "estimator",
    [
        RussianRouletteLogDet(n_exact_terms=2, distribution="geometric", p=0.5),
        RussianRouletteLogDet(n_exact_terms=1, distribution="poisson", rate=2.0),
        RussianRouletteLogDet(n_exact_terms=0, distribution="geometric", p=0.6, probe="rademacher"),
    ],
)
def test_russian_roulette_mean_equals_the_exact_logdet(strong, estimator):
    branch, x = strong
    exact, jac = _exact(branch, x[:1])
    with torch.no_grad():
        estimates = _estimates(estimator, branch, x[:1], n_calls=400, batch=10)
    stderr = estimates.std() / math.sqrt(estimates.numel())
    assert abs(estimates.mean() - exact) < 4 * stderr
    # the test has the power to see a bias: truncating after two terms would be off by more than 4 SE
    assert abs(power_series_from_dense(jac, 2) - exact) > 4 * stderr


def test_russian_roulette_is_unbiased_on_a_convolutional_branch(conv):
    branch, x = conv
    exact, _ = _exact(branch, x[:1])
    with torch.no_grad():
        estimates = _estimates(RussianRouletteLogDet(), branch, x[:1], n_calls=200, batch=10)
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / math.sqrt(estimates.numel())


def test_roulette_weights_are_inverse_reach_probabilities():
    geo = RussianRouletteLogDet(n_exact_terms=2, p=0.25)
    assert [geo.survival(j) for j in (1, 2, 3)] == [1.0, 0.75, 0.75**2]
    poisson = RussianRouletteLogDet(distribution="poisson", rate=1.5)
    pmf = [math.exp(-1.5) * 1.5**i / math.factorial(i) for i in range(40)]
    for j in (0, 1, 2, 5):
        assert poisson.survival(j) == pytest.approx(sum(pmf[j:]), rel=1e-10)
    torch.manual_seed(3)
    draws = [geo.draw() for _ in range(4000)]
    assert min(draws) >= 1 and sum(draws) / len(draws) == pytest.approx(1 / 0.25, rel=0.05)
    torch.manual_seed(3)
    weights = geo.series_weights()
    torch.manual_seed(3)
    n = geo.draw()
    assert weights == [1.0, 1.0] + [1 / 0.75 ** (j - 1) for j in range(1, n + 1)]
    assert geo.expected_vjps() == 2 + 4 and poisson.expected_vjps() == 2 + 1.5


def _flat_param_grad(value, params):
    grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)])


def _mean_gradient(estimator, branch, x1, params, n_calls=150, batch=200):
    """Average over independent calls of d(mean estimate)/d(θ, x1); each call draws its own series length."""
    per_call = []
    for _ in range(n_calls):
        xb = x1.detach().expand(batch, *x1.shape[1:]).clone().requires_grad_(True)
        _, est = estimator(branch, xb)
        per_call.append(torch.cat([_flat_param_grad(est.mean(), params), _input_grad(est.mean(), xb).sum(dim=0)]))
    return torch.stack(per_call).mean(dim=0)


def _exact_gradient(branch, x1, params):
    x1 = x1.detach().requires_grad_(True)
    _, exact = ExactLogDet()(branch, x1)
    return torch.cat([_flat_param_grad(exact.sum(), params), _input_grad(exact.sum(), x1).sum(dim=0)])


def _input_grad(value, x):
    """d value / dx per row, flattened (zero where the log-det does not depend on x, as for a linear branch)."""
    (g,) = torch.autograd.grad(value, x, retain_graph=True, allow_unused=True)
    return (torch.zeros_like(x) if g is None else g).flatten(1)


@pytest.mark.parametrize("name", ["strong", "mlp"])
@pytest.mark.parametrize(
    "estimator",
    [
        RussianRouletteLogDet(gradient="neumann"),
        RussianRouletteLogDet(gradient="backprop"),
        RussianRouletteLogDet(gradient="neumann", distribution="poisson", n_exact_terms=1),
        PowerSeriesLogDet(n_terms=20, gradient="neumann"),
    ],
)
def test_estimated_gradient_matches_autograd_of_the_exact_logdet(name, estimator, request):
    branch, x = request.getfixturevalue(name)
    branch.train()  # gradients w.r.t. parameters, through the normalisation
    params = [p for p in branch.parameters() if p.requires_grad]
    exact = _exact_gradient(branch, x[:1], params)
    assert exact.norm() > 0
    assert (_mean_gradient(estimator, branch, x[:1], params) - exact).norm() / exact.norm() < 0.03


def test_the_gradient_check_sees_a_truncation_bias(strong):
    """The check above can fail: short series (the gradient of two or three terms) miss by more than its tolerance."""
    branch, x = strong
    branch.train()
    params = [p for p in branch.parameters() if p.requires_grad]
    exact = _exact_gradient(branch, x[:1], params)
    for n_terms in (2, 3):
        estimate = _mean_gradient(PowerSeriesLogDet(n_terms=n_terms, gradient="neumann"), branch, x[:1], params)
        assert (estimate - exact).norm() / exact.norm() > 0.03


@pytest.mark.parametrize(
    "estimator", [RussianRouletteLogDet(), PowerSeriesLogDet(n_terms=4, n_probes=2, gradient="neumann")]
)
def test_memory_saving_backward_equals_the_explicit_surrogate(mlp, estimator):
    """Same draws: the value is the series estimate; gradients (x, θ) are the per-sample weighted surrogate w^T J v.

    Here the estimator takes the MLP's closed-form Jacobian; the reference goes through vector-Jacobian products."""
    branch, x = mlp
    branch.eval()  # fixed normalisation, so both passes see the same branch
    params = [p for p in branch.parameters() if p.requires_grad]
    weights = torch.tensor([0.3, -1.7, 2.0])  # a loss that weighs samples unequally

    torch.manual_seed(11)
    xa = x.clone().requires_grad_(True)
    gx_a, value_a = estimator(branch, xa)
    loss_a = (weights * value_a).sum() + (gx_a**2).sum()
    grads_a = torch.autograd.grad(loss_a, [xa, *params], allow_unused=True)

    torch.manual_seed(11)
    xb = x.clone().requires_grad_(True)
    gx_b = branch(xb)
    vjp = lambda u: torch.autograd.grad(gx_b, xb, u, retain_graph=True)[0]  # noqa: E731
    value_b, pairs = estimator.series(vjp, xb, neumann=True)
    surrogate = sum(
        (torch.autograd.grad(gx_b, xb, w, create_graph=True)[0] * v).flatten(1).sum(1) for w, v in pairs
    ) / len(pairs)
    loss_b = (weights * surrogate).sum() + (gx_b**2).sum()
    grads_b = torch.autograd.grad(loss_b, [xb, *params], allow_unused=True)

    assert torch.allclose(value_a, value_b, atol=1e-12)  # the logged value is the estimate itself
    torch.manual_seed(11)
    _, value_c = dataclasses.replace(estimator, gradient="backprop")(branch, x.clone().requires_grad_(True))
    assert torch.allclose(value_a, value_c, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        if gb is None:
            assert ga is None or torch.count_nonzero(ga) == 0
        else:
            assert torch.allclose(ga, gb, atol=1e-12)


def test_neumann_gradient_keeps_no_graph_through_the_series(float64):
    """Saved activations do not grow with the number of terms (they do when backpropagating through the series),
    by vector-Jacobian products (16 dimensions, more than the terms) and with the closed-form Jacobian (2)."""

    def saved_bytes(estimator, dim=16):
        branch = mlp_branch(dim, (64, 64), spectral=SpectralConfig(coeff=0.9)).train()
        x = torch.randn(64, dim, requires_grad=True)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, value = estimator(branch, x)
        return total

    backprop = [saved_bytes(PowerSeriesLogDet(n_terms=n)) for n in (2, 8)]
    neumann = [saved_bytes(PowerSeriesLogDet(n_terms=n, gradient="neumann")) for n in (2, 8)]
    assert backprop[1] > 2 * backprop[0]
    assert neumann[1] == neumann[0]
    closed_form = [saved_bytes(PowerSeriesLogDet(n_terms=n, gradient="neumann"), dim=2) for n in (2, 8)]
    assert closed_form[1] == closed_form[0]


def test_neumann_gradient_needs_a_module_branch(mlp):
    branch, x = mlp
    with pytest.raises(TypeError, match="nn.Module"):
        RussianRouletteLogDet()(lambda t: branch(t), x)


def test_roulette_arguments_are_validated():
    for kwargs, message in [
        ({"n_exact_terms": -1}, "n_exact_terms"),
        ({"distribution": "binomial"}, "distribution"),
        ({"p": 1.0}, "geometric parameter"),
        ({"rate": 0.0}, "rate"),
        ({"gradient": "adjoint"}, "gradient"),
    ]:
        with pytest.raises(ValueError, match=message):
            RussianRouletteLogDet(**kwargs)
    assert isinstance(make_estimator("russian_roulette", n_exact_terms=3), RussianRouletteLogDet)


@pytest.mark.parametrize("activation", ["elu", "softplus", "relu", "lipswish"])
@pytest.mark.parametrize("preactivation", [False, True])
def test_the_closed_form_jacobian_of_an_mlp_branch_equals_autograd(float64, activation, preactivation):
    branch = mlp_branch(
        3, (16, 16), spectral=SpectralConfig(coeff=0.9), activation=activation, preactivation=preactivation
    )
    x = torch.randn(5, 3)
    branch(x)  # the spectral vectors
    branch.eval()
    assert has_closed_form_jacobian(branch)
    gx, jac = mlp_jacobian(branch, x)
    assert torch.allclose(gx, branch(x), atol=1e-12)
    assert torch.allclose(jac, dense_jacobians(branch, x), atol=1e-10)
    assert not has_closed_form_jacobian(mlp_branch(3, (4,), activation="sort"))  # not elementwise: autograd


@pytest.mark.parametrize(
    "estimator",
    [ExactLogDet(), RussianRouletteLogDet(), PowerSeriesLogDet(n_terms=5, gradient="backprop")],
    ids=["exact", "roulette-neumann", "series-backprop"],
)
def test_the_closed_form_path_equals_the_product_path_in_value_and_gradient(float64, estimator):
    """The same estimator on an MLP branch (closed-form J) and on the same branch hidden from that path."""
    branch = mlp_branch(2, (32, 32), spectral=SpectralConfig(coeff=0.9), activation="lipswish", preactivation=True)
    x = torch.randn(16, 2)
    branch(x)
    branch.eval()
    opaque = nn.Sequential(branch)  # a sequence whose element is not a layer: vector-Jacobian products
    assert not has_closed_form_jacobian(opaque)
    params = [p for p in branch.parameters() if p.requires_grad]
    results = []
    for g in (branch, opaque):
        torch.manual_seed(3)
        xg = x.clone().requires_grad_(True)
        gx, logdet = estimator(g, xg)
        loss = (torch.linspace(0.5, 2.0, 16) * logdet).sum() + (gx**2).sum()
        results.append((logdet.detach(), torch.autograd.grad(loss, [xg, *params])))
    (value_a, grads_a), (value_b, grads_b) = results
    assert torch.allclose(value_a, value_b, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, atol=1e-10)


@pytest.mark.parametrize("differentiable", [True, False], ids=["training", "evaluation"])
def test_the_closed_form_products_equal_autograds_in_value_and_gradient(float64, differentiable):
    """A conv branch's series with its products in closed form (``forward_with_jacobian``) and the same branch hidden
    from that path (autograd's products): the same probes and terms give the same value and Neumann gradient."""
    branch = conv_branch(2, 8, activation="lipswish", spectral=SpectralConfig(coeff=0.9))
    x = torch.randn(4, 2, 5, 5)
    branch(x)
    branch.eval()
    opaque = nn.Sequential(branch)
    assert has_structured_jacobian(branch) and not has_structured_jacobian(opaque)
    estimator = RussianRouletteLogDet(n_exact_terms=3, p=0.3)  # gradient="neumann"
    params = [p for p in branch.parameters() if p.requires_grad]
    results = []
    for g in (branch, opaque):
        torch.manual_seed(5)
        xg = x.clone().requires_grad_(True)
        with torch.set_grad_enabled(differentiable):
            gx, logdet = estimator(g, xg)
        assert logdet.requires_grad == differentiable
        if not differentiable:
            results.append((logdet, ()))
            continue
        loss = (torch.linspace(0.5, 2.0, 4) * logdet).sum() + (gx**2).sum()
        results.append((logdet.detach(), torch.autograd.grad(loss, [xg, *params])))
    (value_a, grads_a), (value_b, grads_b) = results
    assert torch.allclose(value_a, value_b, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_differentiable_closed_form_vjp_equals_autograds_and_its_double_backward(float64, kind):
    """What a compiled step backpropagates through: u^T J from the branch's factors, against autograd's vector-Jacobian
    product, and the gradients of a function of it (in u, x and the weights) against autograd's double backward."""
    from pipeline.layers.branches import conv_branch, forward_with_jacobian, mlp_branch

    torch.manual_seed(0)
    if kind == "conv":
        branch, x = conv_branch(3, 8, activation="elu", spectral=None), torch.randn(2, 3, 5, 5)
    else:
        branch, x = mlp_branch(6, (16, 16), activation="elu", spectral=None), torch.randn(4, 6)
    u = torch.randn_like(x)
    results = []
    for closed_form in (True, False):
        xi, ui = x.clone().requires_grad_(True), u.clone().requires_grad_(True)
        if closed_form:
            _, jacobian = forward_with_jacobian(branch, xi)
            product = jacobian.differentiable_vjp(ui)
        else:
            (product,) = torch.autograd.grad(branch(xi), xi, ui, create_graph=True)
        scalar = (product * torch.linspace(-1, 1, product.numel()).reshape(product.shape)).sum() + product.pow(2).sum()
        inputs = [xi, ui, *branch.parameters()]
        grads = torch.autograd.grad(scalar, inputs, allow_unused=True)  # the last bias is not in J
        results.append((product, [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs, strict=True)]))
    (closed, closed_grads), (autograd, autograd_grads) = results
    assert torch.allclose(closed, autograd, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(closed_grads, autograd_grads, strict=True))


def test_a_power_series_training_step_compiles_whole_and_gives_eagers_loss_and_gradients(float64):
    """The backpropagated power series takes its products in closed form: dynamo traces the step as one graph (no
    torch.autograd.grad to break on), and the compiled step (aot_eager: the traced graph, no code generation) gives
    eager's loss and gradients."""
    import copy

    from pipeline.metrics import bits_per_dim
    from pipeline.models import FlowArchitecture, IResNetFlow

    torch.manual_seed(0)
    arch = FlowArchitecture(input_shape=(1, 8, 8), n_blocks=(1, 1), hidden_channels=8, n_power_iterations=2)
    flow = IResNetFlow(arch, estimator=PowerSeriesLogDet(n_terms=3, gradient="backprop"))
    x = torch.rand(8, 1, 8, 8) - 0.5
    flow(x)  # ActNorm's initialisation and the first power iterations, eagerly

    def step_of(model):
        def step(v):
            zs, logdet = model(v)
            return bits_per_dim(model.prior_log_prob(zs) + logdet, model.dim, 17).mean()

        return step

    explained = torch._dynamo.explain(step_of(copy.deepcopy(flow)))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    losses, grads = [], []
    for compiled in (False, True):
        model = copy.deepcopy(flow)  # each from the same state (a step moves the power iteration's vectors)
        step = torch.compile(step_of(model), backend="aot_eager", fullgraph=True) if compiled else step_of(model)
        torch.manual_seed(2)
        loss = step(x)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch._dynamo.reset()
    assert torch.allclose(losses[0], losses[1], atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*grads, strict=True))
