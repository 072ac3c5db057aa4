"""A sweep's search space: named ranges of an entry point's options, read from data and checked before a study.

A space maps option names to ``{type: float|int, low, high[, log]}`` or ``{type: categorical, choices: [...]}``
(YAML or JSON, ``--space-file``); :func:`suggest` draws one trial's values through Optuna's ``suggest_*``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml

DEFAULT_SPACE: dict[str, dict] = {
    "coeff": {"type": "float", "low": 0.5, "high": 0.97},
    "n_terms": {"type": "int", "low": 1, "high": 10},  # density only (the classifier has no log-det)
    "n_power_iterations": {"type": "int", "low": 1, "high": 10},
}
LR_SPACE: dict[str, Any] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


def default_space(*, with_logdet: bool, tune_lr: bool) -> dict[str, dict]:
    """The paper's three knobs (without ``n_terms`` for a target that has no log-det), and the rate if asked."""
    space = dict(DEFAULT_SPACE)
    if not with_logdet:
        space.pop("n_terms")
    if tune_lr:
        space["lr"] = LR_SPACE
    return space


def read_space_file(path: Path) -> dict[str, Any]:
    """A space from a YAML or JSON file; ValueError saying what is wrong with the file."""
    if not path.exists():
        raise ValueError(f"space file {path} does not exist")
    text = path.read_text()
    try:
        space = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ValueError(f"space file {path} is not valid {kind}: {' '.join(str(exc).split())}") from None
    if not isinstance(space, dict) or not space:
        raise ValueError(
            f"space file {path} must map parameter names to ranges, e.g. "
            f"'coeff: {{type: float, low: 0.5, high: 0.97}}'; got {type(space).__name__}"
        )
    return space


def check_space(space: dict[str, Any], options: set[str], target: str) -> None:
    """Every entry names an option of ``target`` and is a well-formed range or list of choices."""
    for name, spec in space.items():
        if name not in options:
            raise ValueError(f"search-space parameter {name!r} is not an option of {target}")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ValueError(f"search-space entry {name!r} needs type float, int or categorical: {spec!r}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ValueError(f"categorical {name!r} needs a non-empty list of choices, got {spec!r}")
            continue
        missing = [key for key in ("low", "high") if key not in spec]
        if missing:
            raise ValueError(f"search-space entry {name!r} needs {' and '.join(missing)}: {spec!r}")
        if not all(isinstance(spec[k], int | float) and not isinstance(spec[k], bool) for k in ("low", "high")):
            raise ValueError(f"{name!r}: low and high must be numbers, got {spec!r}")
        if spec["type"] == "int" and not all(float(spec[k]).is_integer() for k in ("low", "high")):
            raise ValueError(f"{name!r} is an int parameter: low and high must be whole numbers, got {spec!r}")
        if not spec["low"] < spec["high"]:
            raise ValueError(f"{name!r}: need low < high, got {spec}")


def extreme_values(spec: dict[str, Any]) -> list[Any]:
    """The values that decide whether a whole entry is valid for a target: both ends of a range, every choice."""
    return list(spec["choices"]) if spec["type"] == "categorical" else [spec["low"], spec["high"]]


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    """One trial's values of every entry of ``space``."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params
