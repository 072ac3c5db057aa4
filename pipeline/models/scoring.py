"""What a trained model answers for a batch, by kind: each image's bits/dim, class probabilities, a log-density.

:func:`score` is the one implementation behind the MLflow pyfunc model (``experiments/pyfunc_model.py``) and the
library's own use, so a served answer is the library's answer for the same inputs.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.data.preprocessing import standardize
from pipeline.evaluation import bits_per_dim_per_image
from pipeline.models.base import FlowModel
from pipeline.transforms.logdet import ExactLogDet

KINDS = ("density", "classify", "toy")
DENSITY_PASSES = 8  # draws averaged per image: the standard error is returned beside each value
MAX_REQUEST_IMAGES = 2048  # a request's images: more would outlast a serving timeout (60 s) on a CPU worker
SEED = 1234  # a request's answer is reproducible
CHUNK_IMAGES = 128  # images scored at once: the memory of a request is that of one chunk


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The shape of one input of ``model`` (flows know it; a classifier's architecture does)."""
    if isinstance(model, FlowModel):
        return tuple(model.input_shape)
    return tuple(cast(Any, model).arch.input_shape)


def _flow(model: nn.Module, kind: str) -> FlowModel:
    if not isinstance(model, FlowModel):
        raise TypeError(f"a {kind} model is a flow; got a {type(model).__name__}")
    return model


def _images(model: nn.Module, inputs: np.ndarray, pad: int = 0, repeat_channels: int = 1) -> torch.Tensor:
    expected = input_shape(model)
    shape = (expected[0] // repeat_channels, expected[1] - 2 * pad, expected[2] - 2 * pad)
    if inputs.dtype != np.uint8 or inputs.ndim != 4 or tuple(inputs.shape[1:]) != shape:
        raise ValueError(
            f"expected uint8 images of shape (N, {', '.join(map(str, shape))}), got {inputs.dtype} "
            f"{tuple(inputs.shape)}"
        )
    return torch.from_numpy(np.ascontiguousarray(inputs))


def score(model: nn.Module, kind: str, inputs: np.ndarray, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model's answer for ``inputs``, by ``kind`` (``config``: what the training knew of the data).

    * ``density``: uint8 images -> ``bits_per_dim`` and ``standard_error`` per image (``config``: ``n_levels``,
      ``pad``, optional ``repeat_channels`` (1: a model logged before it existed) and ``passes``);
    * ``classify``: uint8 images -> ``probabilities`` (N, K) (``config``: the training set's per-channel ``mean``
      and ``std``);
    * ``toy``: float32 points (N, 2) -> ``log_density`` (exact log-determinant).
    """
    if len(inputs) > MAX_REQUEST_IMAGES:
        raise ValueError(f"at most {MAX_REQUEST_IMAGES} inputs per request, got {len(inputs)}: send them in parts")
    if kind == "density":
        flow = _flow(model, kind)
        pad, n_levels = int(config.get("pad", 0)), int(config["n_levels"])
        repeat = int(config.get("repeat_channels", 1))
        images = _images(flow, inputs, pad, repeat)
        if len(images) and int(images.max()) >= n_levels:  # the flow's density is over its levels only: NaN beyond
            raise ValueError(
                f"pixel values must be 0 to {n_levels - 1} (the model was trained on {n_levels} levels), got "
                f"{int(images.max())}"
            )
        passes = int(config.get("passes", DENSITY_PASSES))
        parts = [  # each chunk its own draws (one seed would give every chunk the same noise)
            bits_per_dim_per_image(
                flow, chunk, n_levels=n_levels, pad=pad, repeat_channels=repeat, passes=passes, seed=SEED + i
            )
            for i, chunk in enumerate(images.split(CHUNK_IMAGES))
        ]
        bpd = torch.cat([b for b, _ in parts]) if parts else torch.empty(0)
        se = torch.cat([s for _, s in parts]) if parts else torch.empty(0)
        return {"bits_per_dim": bpd.numpy(), "standard_error": se.numpy()}
    if kind == "classify":
        images = _images(model, inputs)
        mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
        with torch.no_grad():
            logits = model(standardize(images.to(next(model.parameters()).device), mean, std))
        return {"probabilities": torch.softmax(logits.double(), dim=1).cpu().numpy()}
    if kind == "toy":
        flow = _flow(model, kind)
        if inputs.ndim != 2 or inputs.shape[1] != flow.input_shape[0] or not np.issubdtype(inputs.dtype, np.floating):
            raise ValueError(
                f"expected float points of shape (N, {flow.input_shape[0]}), got {inputs.dtype} {tuple(inputs.shape)}"
            )
        x = torch.from_numpy(np.ascontiguousarray(inputs)).to(next(flow.parameters()).device)
        with flow.estimator(ExactLogDet()):
            log_density = flow.log_prob(x).detach()
        return {"log_density": log_density.double().cpu().numpy()}
    raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
