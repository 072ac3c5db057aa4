"""Where the guarantees live, arithmetic is full precision: no autocast, no TF32.

Policy (docs/design.md, "Precision on GPUs"):

* The spectral normalisation (power iteration, the sigma that divides the weight, the certified bound)
  and the fixed-point inverse (and its implicit backward) run inside :func:`full_precision`: autocast
  off and TF32 off for CUDA matmuls and cuDNN convolutions. A bf16 power iteration misjudges sigma by
  ~0.4% and a TF32 convolution has a relative error near 1e-3, so either would break ``||W|| <= c`` or
  make the inverse's 1e-6 tolerance unreachable. Their cost is small: a few matrix-vector products per
  layer per step, and the inverse is not on the training path.
* The log-det series accumulates in at least float32 whatever the dtype of its vector-Jacobian products.
* Everything else (the branch's forward and backward in training) follows the caller: ``--amp`` (bf16
  autocast) and PyTorch's TF32 defaults apply there.
* The inverse's tolerance is floored at what its dtype can resolve (:func:`relative_precision_floor`), and
  a residual that stops decreasing is reported as a precision floor, not as a failure to contract.

TF32 is switched with the ``fp32_precision`` API of PyTorch >= 2.9 (:data:`MINIMUM_TORCH`, the project's
declared floor) and restored exactly on exit. The switch is process-wide, like the flags themselves: another
thread running CUDA kernels meanwhile gets full fp32 too (slower, never less accurate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

MINIMUM_TORCH = (2, 9)  # torch.backends.cuda.matmul.fp32_precision and torch.backends.cudnn.conv.fp32_precision

# the residual of a fixed-point iteration in dtype d cannot reliably go below ~ this many eps(d) times ||y||
PRECISION_FLOOR_EPS = 8


def _tf32_switches() -> list[Any]:
    # the fp32_precision switches (torch >= 2.9) are set at run time; torch's stubs do not declare them
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv]  # type: ignore[attr-defined]


@contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off on ``device_type`` and, for CUDA, TF32 off for matmuls and convolutions; restored on exit.

    Cheap where there is nothing to switch (a CPU forward without autocast): it runs for every spectral
    layer in every training step.
    """
    if device_type != "cuda":  # TF32 is CUDA's alone
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        else:
            yield
        return
    switches = _tf32_switches()
    saved = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = "ieee"
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        for s, value in zip(switches, saved, strict=True):
            s.fp32_precision = value


def tf32_enabled() -> bool:
    """Whether CUDA matmuls or cuDNN convolutions may use TF32 now (read through the new API only)."""
    return any(s.fp32_precision == "tf32" for s in _tf32_switches())


def relative_precision_floor(dtype: torch.dtype) -> float:
    """The smallest relative residual a fixed-point solve carried out in ``dtype`` is asked for."""
    return PRECISION_FLOOR_EPS * torch.finfo(dtype).eps
