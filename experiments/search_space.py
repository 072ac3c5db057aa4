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
    "n_terms": {"type": "int", "low": 1, "high": 10},  # the series' terms: the estimator's own option (below)
    "n_power_iterations": {"type": "int", "low": 1, "high": 10},
}
# the option that sets the log-det series' terms, by estimator (the exact log-det has none, the classifier no log-det)
SERIES_TERMS_OPTION = {"power_series": "n_terms", "russian_roulette": "n_exact_terms"}
KEYS = {
    "float": {"type", "low", "high", "log"},
    "int": {"type", "low", "high", "log"},
    "categorical": {"type", "choices"},
}
LR_SPACE: dict[str, Any] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}


def default_space(*, estimator: str | None, tune_lr: bool) -> dict[str, dict]:
    """The paper's three knobs, and the rate if asked: the series' terms as ``estimator`` sets them (``n_terms`` of
    the power series, the roulette's ``n_exact_terms``), left out where it has none or there is no log-det (None)."""
    space = {"coeff": DEFAULT_SPACE["coeff"]}
    terms = SERIES_TERMS_OPTION.get(estimator or "")
    if terms:
        space[terms] = DEFAULT_SPACE["n_terms"]
    space["n_power_iterations"] = DEFAULT_SPACE["n_power_iterations"]
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
        unknown = sorted(set(spec) - KEYS[spec["type"]])
        if unknown:  # a typo of ``log`` would otherwise search a linear range silently
            raise ValueError(
                f"search-space entry {name!r} has unknown key(s) {unknown}; a {spec['type']} entry takes "
                f"{sorted(KEYS[spec['type']])}"
            )
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


def distributions(space: dict[str, dict]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Each entry as the Optuna distribution :func:`suggest` draws it from."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in space.items():
        if spec["type"] == "float":
            out[name] = optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            out[name] = optuna.distributions.IntDistribution(
                int(spec["low"]), int(spec["high"]), log=spec.get("log", False)
            )
        else:
            out[name] = optuna.distributions.CategoricalDistribution(spec["choices"])
    return out


def check_study_compatible(study: optuna.Study, space: dict[str, dict]) -> None:
    """A study resumed by name must draw from a space its trials agree with: Optuna refuses every trial of a
    parameter whose distribution changed kind (float to int, other choices), so it is refused before the first."""
    wanted = distributions(space)
    for trial in study.get_trials(deepcopy=False):
        for name, stored in trial.distributions.items():
            if name not in wanted:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(stored, wanted[name])
            except ValueError:
                raise ValueError(
                    f"study {study.study_name!r} searched {name} as {stored} (trial {trial.number}); this sweep asks "
                    f"{wanted[name]}: use the study's space or another --study-name"
                ) from None


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
