"""Configuration of the entry points: options from their declarations, presets as data, resumed runs' configs.

A config is a frozen dataclass composed of option groups (:mod:`experiments.options`: data, training, run,
estimator, inverse, model, and the entry point's own), validated in its ``__post_init__``. Every option is declared
once, in its group; the command line (:mod:`experiments.command_line`), the MLproject (``analysis.mlproject``) and
the resolved configuration a run logs (:func:`grouped_config`) are generated from the declarations. The model
group's options are the fields of the library's architecture dataclass, with the types the library declares. A
preset is data: a flat dict of option values on top of the defaults (option names are unique across groups,
:func:`option_types` checks it). An option left unset, or passed as an empty string as ``mlflow run`` does for an
unset string parameter, takes the preset's value.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar, cast

from experiments.options import ArchitectureOptions
from experiments.tracking import active_run_id, log_json, log_params_flat, run_status
from pipeline.fields import applies, conditional, field_help
from pipeline.training.checkpoint import load_checkpoint

C = TypeVar("C")

RESUME_OVERRIDABLE = ("epochs", "device", "progress", "checkpoint_dir", "register_model", "tracking_outage_s")


def option_types(config_cls: type) -> dict[str, Any]:
    """Every option of a config class, flat, with its type: its fields and (a model group) the architecture's.

    The names are unique: a field that shadows an architecture field is refused here, where it is declared.
    """
    hints = typing.get_type_hints(config_cls)
    own = {f.name: hints[f.name] for f in fields(config_cls) if f.name != "architecture_overrides"}
    arch = config_cls.architecture_types() if issubclass(config_cls, ArchitectureOptions) else {}
    clash = sorted(set(own) & set(arch))
    if clash:
        raise TypeError(f"{config_cls.__name__} declares {clash}, which the architecture already declares")
    return own | arch


def option_help(config_cls: type) -> dict[str, str]:
    """Each option's one-line help text, from where it is declared (its field, or the architecture's field)."""
    arch_help = field_help(architecture_class(config_cls)) if issubclass(config_cls, ArchitectureOptions) else {}
    own = field_help(config_cls)
    return {name: own.get(name) or arch_help.get(name, "") for name in option_types(config_cls)}


def architecture_class(config_cls: type) -> type:
    """The library's architecture dataclass behind a model group's options."""
    return type(next(iter(config_cls.ARCHITECTURES.values())))  # type: ignore[attr-defined]


def declaring_class(config_cls: type, name: str) -> type:
    """The dataclass that declares option ``name``: the config class, or the architecture behind its model group."""
    own = {f.name for f in fields(cast(Any, config_cls))}
    return config_cls if name in own else architecture_class(config_cls)


def option_is_conditional(config_cls: type, name: str) -> bool:
    """Whether option ``name`` matters only in some configurations (``n_terms``: with the power series)."""
    return conditional(declaring_class(config_cls, name), name)


def option_applies(cfg: Any, name: str, values: Mapping[str, Any] | None = None) -> bool:
    """Whether option ``name`` matters for ``cfg`` (its field's ``applies``: ``n_terms`` only for the power series)."""
    values = flat_options(cfg) if values is None else values
    return applies(declaring_class(type(cfg), name), name, values)


def option_groups(config_cls: type) -> dict[str, str]:
    """Each option's group: the ``GROUP`` of the class that first declares it (the entry point's own: its name)."""
    names = option_types(config_cls)
    own_group = entry_point_module(config_cls).rsplit(".", 1)[-1]
    groups: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        for name in klass.__dict__.get("__annotations__", {}):
            if name in names and name not in groups:
                groups[name] = klass.__dict__.get("GROUP", own_group)
    arch = config_cls.architecture_types() if issubclass(config_cls, ArchitectureOptions) else {}
    return groups | {name: ArchitectureOptions.GROUP for name in arch}


GROUP_ORDER = ("data", "model", "training", "estimator", "inverse", "evaluation")  # then an entry point's own, "run"


def ordered_options(config_cls: type) -> list[str]:
    """The options in the order of their groups (``--help``, the MLproject): data, model, training, estimator,
    inverse, evaluation, an entry point's own, run."""
    groups = option_groups(config_cls)
    rank = {g: i for i, g in enumerate(GROUP_ORDER)} | {"run": len(GROUP_ORDER) + 1}
    return sorted(groups, key=lambda name: rank.get(groups[name], len(GROUP_ORDER)))  # stable within a group


def build_config(config_cls: type[C], **options: Any) -> C:
    """``config_cls`` from flat options: architecture fields become ``architecture_overrides``; an unknown name is
    refused with the options there are."""
    types_ = option_types(config_cls)
    unknown = sorted(set(options) - set(types_) - {"architecture_overrides"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}")
    own = {f.name for f in fields(cast(Any, config_cls))}
    arch = {k: v for k, v in options.items() if k not in own}
    if arch:
        options = {k: v for k, v in options.items() if k in own}
        options["architecture_overrides"] = {**options.get("architecture_overrides", {}), **arch}
    return config_cls(**options)


def flat_options(cfg: Any) -> dict[str, Any]:
    """Every option's value in this config, flat (the architecture's fields resolved from preset and overrides)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "architecture_overrides"}
    return values | (resolved_architecture(cfg) or {})


def set_options(cfg: Any, presets: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The options whose value differs from the preset's (all of them that differ from the defaults, without
    presets)."""
    preset = getattr(cfg, "preset", None)
    reference = config_from_preset(type(cfg), presets, preset) if presets and preset else type(cfg)()
    base = flat_options(reference)
    skip = ("preset", "resume", "progress")
    return {k: v for k, v in flat_options(cfg).items() if k not in skip and v != base.get(k)}


NOT_PARAMETERS = ("preset", "resume", "progress", "experiment_name", "run_name")  # bookkeeping, or logged as tags


def run_parameters(cfg: Any) -> dict[str, str]:
    """What a run logs as its parameters: ``preset`` and every option that has a value and applies to this run, as
    ``-P`` takes it (an estimator's options only with that estimator; an unset path not at all), so that trials and
    runs compare column by column and a parameter always changed something."""
    values = flat_options(cfg)
    params = {"preset": cfg.preset} if getattr(cfg, "preset", None) else {}
    for name, value in values.items():
        if name not in NOT_PARAMETERS and value is not None and option_applies(cfg, name, values):
            params[name] = option_text(value)
    return params


# left out of a run's name: where and how it runs, not what it trains
NOT_IN_RUN_NAME = (
    *NOT_PARAMETERS, "device", "threads", "deterministic", "checkpoint_dir", "data_dir", "download",
    "register_model", "log_system_metrics", "log_every", "tracking_outage_s",
)  # fmt: skip
RUN_NAME_OPTIONS = 4  # changed options named in a run's name; more are counted


def entry_point_name(config_cls: type) -> str:
    """``density``, ``classify``, ...: the entry point a config class belongs to."""
    return entry_point_module(config_cls).rsplit(".", 1)[-1]


def default_run_name(cfg: Any) -> str:
    """``density-quick``, ``density-quick coeff=0.9 epochs=2``: the entry point, its preset and the options set
    away from the preset (the first few, then how many more)."""
    presets = entry_point_presets(type(cfg))
    name = entry_point_name(type(cfg)) + (f"-{cfg.preset}" if getattr(cfg, "preset", None) else "")
    changed = [f"{k}={option_text(v)}" for k, v in set_options(cfg, presets).items() if k not in NOT_IN_RUN_NAME]
    shown = changed[:RUN_NAME_OPTIONS] + (
        [f"+{len(changed) - RUN_NAME_OPTIONS} more"] * (len(changed) > RUN_NAME_OPTIONS)
    )
    return " ".join([name, *shown])[:250]


def run_tags(cfg: Any) -> dict[str, str]:
    """What a run is, as its tags (the report selects runs by them): the entry point, and its preset."""
    from experiments.tracking import ENTRY_POINT_TAG, PRESET_TAG

    tags = {ENTRY_POINT_TAG: entry_point_name(type(cfg))}
    return tags | ({PRESET_TAG: cfg.preset} if getattr(cfg, "preset", None) else {})


def grouped_config(cfg: Any, architecture: Any = None) -> dict[str, dict[str, Any]]:
    """The resolved configuration by group (the run's ``config.json``): the model group holds the architecture the
    run built (``architecture``, with the data's fields) beside the group's other options, or the preset with its
    overrides when nothing was built."""
    groups = option_groups(type(cfg))
    out: dict[str, dict[str, Any]] = {}
    for name, value in flat_options(cfg).items():
        out.setdefault(groups[name], {})[name] = value
    if architecture is not None:
        from dataclasses import asdict

        # The group's own options (the classifier's variant) stay; the built architecture's fields join them.
        own = {k: v for k, v in out.get(ArchitectureOptions.GROUP, {}).items() if k != "architecture_overrides"}
        out[ArchitectureOptions.GROUP] = {**own, "architecture": cfg.architecture, **asdict(architecture)}
    return out


def check_at_least(cfg: Any, minimum: int, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(cfg, name)}")


def check_finite(cfg: Any) -> None:
    """Every float option of ``cfg`` is a finite number (``inf`` passes ``> 0`` checks, NaN every comparison)."""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)} | dict(getattr(cfg, "architecture_overrides", {}))
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def check_directory_usable(path: str, name: str) -> None:
    """``path`` is, or can be created as, a directory this process can write (checked before any run starts)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {path} cannot be a directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path} is not writable by this process ({existing} refuses it)")


def check_common(cfg: Any) -> None:
    """The checks every run's config makes: finite floats, a non-negative seed, a usable checkpoint directory; an
    unset experiment name becomes the entry point's, the paths absolute (as they are recorded), a model group's
    architecture and overrides are checked."""
    if getattr(cfg, "experiment_name", "") is None:
        object.__setattr__(cfg, "experiment_name", entry_point_name(type(cfg)))
    for name in ("checkpoint_dir", "data_dir"):
        if getattr(cfg, name, None):
            object.__setattr__(cfg, name, str(Path(getattr(cfg, name)).expanduser().absolute()))
    if isinstance(cfg, ArchitectureOptions):
        cfg._check_architecture()
    check_finite(cfg)
    if getattr(cfg, "seed", 0) < 0:
        raise ValueError(f"seed must be >= 0 (it seeds torch, numpy and Python alike), got {cfg.seed}")
    if hasattr(cfg, "checkpoint_dir"):
        check_directory_usable(cfg.checkpoint_dir, "checkpoint_dir")
    cores = os.cpu_count() or 1
    if not 0 <= getattr(cfg, "threads", 0) <= cores:  # more threads than cores only slow every one of them down
        raise ValueError(
            f"threads must be 0 (the cores shared out) to {cores} (this machine's cores), got {cfg.threads}"
        )
    if getattr(cfg, "register_model", None) is not None:
        check_model_name(cfg.register_model)
    if getattr(cfg, "tracking_outage_s", 1.0) <= 0:
        raise ValueError(f"tracking_outage_s must be > 0 (seconds), got {cfg.tracking_outage_s}")


def check_model_name(name: str) -> None:
    """A Model Registry name MLflow accepts, checked by MLflow's own validator before anything trains."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ValueError(f"register_model {name!r} is not a Model Registry name: {exc.message}") from None


def entry_point_module(config_cls: type) -> str:
    """The entry point module of a config (its own, else its ``ENTRY_POINT_MODULE``), also run as ``__main__``."""
    module = getattr(config_cls, "ENTRY_POINT_MODULE", None) or config_cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else "experiments"
    return module


def option_text(value: Any) -> str:
    """An option's value as the command line and ``-P`` take it (``4,4``, ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def log_configuration(cfg: Any, architecture: Any = None) -> None:
    """A new run's configuration: :func:`run_parameters` as its parameters, and the whole resolved configuration
    by group as the artifact ``config.json`` (:func:`grouped_config`).

    Under ``mlflow run``, MLflow has already logged the parameters its entry point declares (those that apply to every
    run, ``analysis.mlproject``) and those given with ``-P``; those are not logged again.
    """
    import mlflow

    from experiments.tracking_store import retry_tracking_write

    logged = retry_tracking_write(lambda: mlflow.tracking.MlflowClient().get_run(active_run_id()).data.params)
    log_params_flat({k: v for k, v in run_parameters(cfg).items() if k not in logged})
    log_json(grouped_config(cfg, architecture), "config.json")


def warn_inapplicable(cfg: Any, given: Mapping[str, Any]) -> None:
    """A warning for each option given on the command line that has no effect in this configuration."""
    import logging

    values = flat_options(cfg)
    for name in given:
        if name in values and not option_applies(cfg, name, values):
            logging.getLogger(entry_point_module(type(cfg))).warning(
                "--%s has no effect in this configuration (see --help); it is not logged", name.replace("_", "-")
            )


def entry_point_presets(config_cls: type) -> Mapping[str, Mapping[str, Any]] | None:
    """The ``PRESETS`` of the module that declares ``config_cls`` (``None``: it has none)."""
    return getattr(importlib.import_module(entry_point_module(config_cls)), "PRESETS", None)


# --- the command line ---------------------------------------------------------------------------


def config_from_preset(config_cls: type[C], presets: Mapping[str, Mapping[str, Any]] | None, preset: str | None,
                       **overrides: Any) -> C:  # fmt: skip
    """The preset's options with ``overrides`` on top (flat option names, architecture fields included)."""
    if not presets:
        return build_config(config_cls, **overrides)
    if preset is None or preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return build_config(config_cls, **{**presets[preset], **overrides, "preset": preset})


def saved_options(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's configuration as flat options: today's (``architecture_overrides`` a dict) or one written
    before the option groups (every architecture field a field of its own)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k != "architecture_overrides"}
    for k, v in dict(saved.get("architecture_overrides") or {}).items():
        options[k] = tuple(v) if isinstance(v, list) else v
    return options


def resolved_architecture(cfg: Any) -> dict[str, Any] | None:
    """Every architecture option of ``cfg`` as it resolves now (preset and overrides); ``None`` without a model
    group."""
    if not isinstance(cfg, ArchitectureOptions):
        return None
    return {name: cfg.architecture_option(name) for name in cfg.architecture_types()}


def config_for_resume(config_cls: type[C], run_id: str, **overrides: Any) -> C:
    """The configuration a run was started with, read from its checkpoint.

    Only ``epochs`` (to extend a run), ``device``, ``progress``, ``checkpoint_dir``, ``register_model`` (a name
    the registry refused) and ``tracking_outage_s`` may change; anything else would no longer be the same run.
    """
    unknown = set(overrides) - set(RESUME_OVERRIDABLE)
    if unknown:
        name = entry_point_module(config_cls).rsplit(".", 1)[-1]
        raise ValueError(
            f"a resumed run keeps its configuration; cannot change {sorted(unknown)} on resume (with mlflow run, "
            f"resume with: mlflow run . -e {name}-resume -P resume={run_id})"
        )
    checkpoint_dir = overrides.get("checkpoint_dir", config_cls.checkpoint_dir)  # type: ignore[attr-defined]
    path = Path(str(checkpoint_dir)) / run_id / "last.pt"
    if not path.exists():
        raise ValueError(f"cannot resume run {run_id}: no checkpoint at {path}")
    checkpoint = load_checkpoint(path)
    # what the configuration needs; the rest (weights, optimizer, RNG) is checked against the model before the run
    # is touched (pipeline.training.loop.check_checkpoint_fits)
    missing = [key for key in ("config", "epoch") if key not in checkpoint]
    if missing or not isinstance(checkpoint.get("config"), dict):
        raise ValueError(f"cannot resume run {run_id}: the checkpoint {path} lacks {', '.join(missing) or 'config'}")
    expected = entry_point_module(config_cls)
    started_by = checkpoint.get("entry_point")  # recorded since this check exists
    saved = saved_options(checkpoint["config"])
    foreign = sorted(set(saved) - set(option_types(config_cls)))
    name = expected.rsplit(".", 1)[-1]
    if started_by and started_by != expected:
        raise ValueError(
            f"run {run_id} was not started by {name} but by {started_by.rsplit('.', 1)[-1]}; resume it with "
            f"python -m {started_by} --resume {run_id}"
        )
    if foreign:  # a checkpoint from before the entry point was recorded, or of an option since removed
        raise ValueError(
            f"run {run_id} was not started by {name} (its options {', '.join(foreign[:4])} are not {name}'s); resume "
            "it with the entry point that started it"
        )
    # the model as it ran: its every architecture field where the checkpoint records them, else (written before they
    # were recorded) the values of the fields whose presets changed since, as they were then
    pinned = checkpoint.get("architecture") or getattr(config_cls, "PRESET_FIELDS_BEFORE", {})
    saved = {**{k: tuple(v) if isinstance(v, list) else v for k, v in pinned.items()}, **saved}
    if "architecture_overrides" not in checkpoint["config"]:  # written before the option groups, every option in it
        # except those added since the run started: the values that reproduce it, not today's preset
        saved = {**getattr(config_cls, "BEFORE_FIELD_EXISTED", {}), **saved}
    if not isinstance(checkpoint["epoch"], int) or not 0 <= checkpoint["epoch"] <= saved["epochs"]:
        raise ValueError(
            f"cannot resume run {run_id}: the checkpoint {path} records epoch {checkpoint['epoch']!r} of a run of "
            f"{saved['epochs']} epochs"
        )
    epochs = overrides.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise ValueError(f"cannot shorten a run on resume ({saved['epochs']} epochs were configured)")
    if checkpoint["epoch"] >= epochs and run_status(run_id) == "FINISHED":
        raise ValueError(
            f"run {run_id} already FINISHED all {checkpoint['epoch']} epochs; resuming it would log its final "
            f"metrics and model again. Pass --epochs N with N > {checkpoint['epoch']} to train it further"
        )
    return build_config(config_cls, **{**saved, "resume": run_id, **overrides})
