"""A logged model as data: its weights (a state dict) and how to rebuild it (architecture as JSON).

``save_model(model, folder)`` writes ``weights.pt`` (tensors only, read with ``weights_only=True``) and
``model.json`` (the class, its architecture dataclass, the blocks' default log-det estimator and inverse
settings); ``load_model_folder(folder)`` rebuilds the model with the library's builders and loads the
weights. Nothing in either file is executed on loading, unlike a pickled module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipeline.models.base import load_weights
from pipeline.models.classifier import ClassifierArchitecture, ResidualClassifier
from pipeline.models.flow import FlowArchitecture, IResNetFlow
from pipeline.models.glow import GlowArchitecture, GlowFlow
from pipeline.models.toy import VectorFlow, VectorFlowArchitecture
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import LogDetEstimator, make_estimator
from pipeline.transforms.residual import InvertibleResidualBlock

MODEL_FORMAT = "iresnet-pipeline/model-v1"
WEIGHTS_FILE, SPEC_FILE = "weights.pt", "model.json"

# class name -> (class, its architecture dataclass, whether it takes a default log-det estimator)
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type, bool]] = {
    "IResNetFlow": (IResNetFlow, FlowArchitecture, True),
    "ResidualClassifier": (ResidualClassifier, ClassifierArchitecture, False),
    "VectorFlow": (VectorFlow, VectorFlowArchitecture, True),
    "GlowFlow": (GlowFlow, GlowArchitecture, False),  # the toy baseline
}


def _estimator_spec(estimator: LogDetEstimator) -> dict[str, Any]:
    if not is_dataclass(estimator):
        raise TypeError(f"cannot describe the estimator {type(estimator).__name__} as data (not a dataclass)")
    return {"name": estimator.name, **{f.name: getattr(estimator, f.name) for f in fields(estimator)}}


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What :func:`build_model` needs to rebuild ``model`` (plain JSON data)."""
    name = type(model).__name__
    if name not in MODEL_CLASSES or not isinstance(model, MODEL_CLASSES[name][0]):
        raise TypeError(f"cannot describe a {name} as data; supported: {sorted(MODEL_CLASSES)}")
    blocks = [m for m in model.modules() if isinstance(m, InvertibleResidualBlock)]
    spec: dict[str, Any] = {"format": MODEL_FORMAT, "class": name, "architecture": asdict(cast(Any, model).arch)}
    if blocks:
        spec["inverse_config"] = asdict(blocks[0].inverse_config)
        if MODEL_CLASSES[name][2]:
            spec["estimator"] = _estimator_spec(blocks[0].estimator)
    return spec


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model of the described class and architecture (weights not loaded)."""
    if spec.get("format") != MODEL_FORMAT:
        raise ValueError(f"not a model description of format {MODEL_FORMAT!r} (found {spec.get('format')!r})")
    try:
        cls, arch_cls, takes_estimator = MODEL_CLASSES[spec["class"]]
    except KeyError:
        raise ValueError(f"unknown model class {spec.get('class')!r}; known: {sorted(MODEL_CLASSES)}") from None
    kwargs: dict[str, Any] = {}
    if "inverse_config" in spec:
        kwargs["inverse_config"] = FixedPointConfig(**spec["inverse_config"])
    if takes_estimator and "estimator" in spec:
        estimator = dict(spec["estimator"])
        kwargs["estimator"] = make_estimator(estimator.pop("name"), **estimator)
    return cls(arch_cls(**spec["architecture"]), **kwargs)


def save_model(model: nn.Module, folder: str | Path) -> None:
    """Write ``weights.pt`` and ``model.json`` into ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))


def load_model_folder(folder: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_model` (in evaluation mode)."""
    folder = Path(folder)
    if not (folder / SPEC_FILE).exists():
        hint = (
            " (a pickled model of an older version: refused, loading it could run code)"
            if (folder / "MLmodel").exists()
            else ""
        )
        raise ValueError(f"no {SPEC_FILE} in {folder}{hint}")
    model = build_model(json.loads((folder / SPEC_FILE).read_text()))
    try:
        state = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # unreadable, truncated, or holding Python objects beyond tensors
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"{folder / WEIGHTS_FILE} cannot be read as weights ({reason})") from None
    load_weights(model, state, str(folder / WEIGHTS_FILE))
    return model.to(map_location).eval()
