"""The precision policy: full precision where the guarantees live, tolerances that know their dtype.

TF32 itself only exists on NVIDIA GPUs; here the switches are checked from inside the code they must
govern, and a deliberately low-precision operator stands in for the arithmetic: each output carries a
relative error of up to 2^-10 (TF32's unit roundoff) that changes chaotically with the input, as
rounding does, and that the solve cannot switch off (like TF32 inside a custom kernel).
"""

import contextlib
import logging

import pytest
import torch
from torch import nn

import pipeline.layers.spectral
import pipeline.transforms.inverse
from pipeline.layers import SpectralNormConv2d
from pipeline.layers.spectral import SpectralConfig
from pipeline.precision import full_precision, relative_precision_floor, tf32_enabled
from pipeline.transforms import FixedPointConfig, InverseDidNotConverge, PowerSeriesLogDet, fixed_point_inverse


def _switches() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.fixture
def tf32_on():
    """The state a user on an Ampere+ GPU may well run in: TF32 allowed for matmuls and convolutions."""
    saved = _switches()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """TF32 is CUDA's, so on CPU ``full_precision`` leaves it alone; here the library's calls also switch it, as
    they would for CUDA tensors, so that a branch can see from inside whether its caller switched it off."""

    @contextlib.contextmanager
    def also_cuda(device_type: str):
        with full_precision(device_type), full_precision("cuda"):
            yield

    for module in (pipeline.transforms.inverse, pipeline.layers.spectral):
        monkeypatch.setattr(module, "full_precision", also_cuda)


def test_full_precision_switches_tf32_off_for_cuda_and_restores_it_even_on_error(tf32_on):
    with pytest.raises(RuntimeError, match="inside"), full_precision("cuda"):
        assert _switches() == ("ieee", "ieee") and not tf32_enabled()
        raise RuntimeError("inside")
    assert _switches() == ("tf32", "tf32") and tf32_enabled()


def test_full_precision_switches_autocast_off_and_leaves_tf32_alone_on_cpu(tf32_on):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with full_precision("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert _switches() == ("tf32", "tf32")  # nothing on a CPU computes in TF32
        assert torch.is_autocast_enabled("cpu")


def test_the_floor_leaves_float32_defaults_alone_and_raises_bf16():
    assert relative_precision_floor(torch.float32) < FixedPointConfig().rtol
    assert relative_precision_floor(torch.float64) < 1e-14
    assert relative_precision_floor(torch.bfloat16) == pytest.approx(8 * 2.0**-7)


class _RecordingBranch(nn.Module):
    """A contraction ``g(x) = tanh(W x) * 0.5`` that records the arithmetic it was called under."""

    def __init__(self, dim: int = 6, dtype: torch.dtype = torch.float32, low_precision: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, dim, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.mul_(0.9 / torch.linalg.matrix_norm(self.linear.weight.float(), ord=2))
        self.low_precision = low_precision
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((tf32_enabled(), torch.is_autocast_enabled("cpu")))
        out = 0.5 * torch.tanh(self.linear(x))
        if self.low_precision:  # a rounding-like error: up to 2^-10 relative, a chaotic function of the input
            out = out * (1 + 2.0**-10 * torch.sin(1e6 * x))
        return out


def test_the_inverse_and_its_gradient_run_in_full_precision_whatever_the_caller_set(tf32_on, as_on_a_gpu):
    torch.manual_seed(0)
    g = _RecordingBranch()
    y = torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = fixed_point_inverse(g, y, FixedPointConfig(strict=True))
        result.x.sum().backward()
    assert g.calls and not any(tf32 or autocast for tf32, autocast in g.calls)
    # under bf16 autocast the same solve would stall near 1e-2; in full precision it meets 1e-6
    assert result.converged.all() and not result.stalled.any()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_a_low_precision_operator_stalls_early_and_says_why(caplog):
    torch.manual_seed(0)
    y = torch.randn(8, 6)
    g = _RecordingBranch(low_precision=True)
    with caplog.at_level(logging.WARNING):
        result = fixed_point_inverse(g, y, FixedPointConfig(max_iterations=500))
    assert not result.converged.any() and result.stalled.all()
    # stopped at the floor, not after 500 evaluations of g; the residual is the operator's precision
    assert int(result.iterations.max()) < 100
    rel = result.residual / y.norm(dim=1)
    assert (rel < 3e-3).all() and (rel > 1e-5).all()
    assert "lower precision than the tolerance" in caplog.text and "stopped because" in caplog.text
    with pytest.raises(InverseDidNotConverge, match="lower precision"):
        fixed_point_inverse(g, y, FixedPointConfig(strict=True))
    # a tolerance the operator can meet converges; the same operator in full precision meets 1e-6
    assert fixed_point_inverse(g, y, FixedPointConfig(rtol=3e-3, strict=True)).converged.all()
    exact = _RecordingBranch()
    exact.load_state_dict(g.state_dict())
    assert fixed_point_inverse(exact, y, FixedPointConfig(strict=True)).converged.all()


def test_a_contraction_that_keeps_improving_is_never_called_stalled():
    """Lip(g) = 0.99: the residual falls 1% per iteration; no stall, it runs to the tolerance."""
    torch.manual_seed(0)
    g = nn.Linear(5, 5, bias=False).double()
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
        g.weight.copy_(0.99 * q)
    y = torch.randn(4, 5, dtype=torch.float64)
    result = fixed_point_inverse(g, y, FixedPointConfig(atol=0, rtol=1e-9, max_iterations=5000))
    assert result.converged.all() and not result.stalled.any()
    assert int(result.iterations.min()) > 1000


def test_a_bf16_solve_gets_a_bf16_tolerance():
    torch.manual_seed(0)
    g = _RecordingBranch(dtype=torch.bfloat16)
    y = torch.randn(8, 6).to(torch.bfloat16)
    result = fixed_point_inverse(g, y, FixedPointConfig(strict=True))  # rtol 1e-6 would be unreachable in bf16
    assert result.converged.all()
    assert (result.residual.float() <= relative_precision_floor(torch.bfloat16) * y.float().norm(dim=1)).all()


def test_the_power_iteration_and_the_normalising_sigma_run_without_tf32(tf32_on, as_on_a_gpu):
    torch.manual_seed(0)
    layer = SpectralNormConv2d(3, 4, 3, spectral=SpectralConfig(coeff=0.9, n_power_iterations=2), padding=1)
    seen = []
    operator = layer._operator

    def recording(*args, **kwargs):
        seen.append(tf32_enabled())
        return operator(*args, **kwargs)

    layer._operator = recording
    x = torch.randn(2, 3, 5, 5)
    layer(x)
    layer.eval()
    layer(x)
    assert seen and not any(seen)
    assert tf32_enabled()  # and the caller's setting is back


@pytest.mark.parametrize("autocast", [False, True])
def test_the_series_accumulates_in_float32_whatever_the_dtype_of_its_products(autocast):
    torch.manual_seed(0)
    g = _RecordingBranch(dtype=torch.float32 if autocast else torch.bfloat16)
    x = torch.randn(4, 6, dtype=torch.float32 if autocast else torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        gx, logdet = PowerSeriesLogDet(n_terms=8)(g, x)
    assert gx.dtype == torch.bfloat16 and logdet.dtype == torch.float32


def test_the_declared_torch_floor_has_the_precision_api_the_library_uses():
    """``full_precision`` uses the ``fp32_precision`` switches (torch >= 2.9); a lower floor in pyproject.toml let
    torch 2.4-2.8 install and fail at the first spectral forward on CUDA."""
    import re
    from pathlib import Path

    from pipeline.precision import MINIMUM_TORCH

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', pyproject)
    assert floor is not None and (int(floor[1]), int(floor[2])) >= MINIMUM_TORCH
    installed = tuple(int(part) for part in torch.__version__.split(".")[:2])
    assert installed >= MINIMUM_TORCH
    assert all(hasattr(s, "fp32_precision") for s in (torch.backends.cuda.matmul, torch.backends.cudnn.conv))
