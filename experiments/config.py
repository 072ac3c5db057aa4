"""Configuration of the entry points: option sets shared by several configs, presets, the command line.

A config is a frozen dataclass validated in its ``__post_init__``. Every field becomes ``--field-name``
(:func:`build_parser`, from the resolved type hints); an option left unset, or passed as an empty string
as ``mlflow run`` does for an unset parameter, takes the preset's value. A preset is data: field values
on top of the defaults. Architecture fields left ``None`` take the values of the model preset the config
names (:func:`fill_from_architecture`), so a run's ``config.*`` parameters are always concrete.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from experiments.tracking import run_status
from pipeline.training.checkpoint import load_checkpoint
from pipeline.transforms.inverse import FixedPointConfig
from pipeline.transforms.logdet import LogDetEstimator, make_estimator

C = TypeVar("C")

RESUME_OVERRIDABLE = ("epochs", "device", "progress", "checkpoint_dir")


@dataclass(frozen=True)
class EstimatorOptions:
    """The log-det estimator of a run, as flat options (fields of the density and toy configs).

    ``estimator``: ``power_series`` (the paper: ``n_terms``, biased by the truncation),
    ``russian_roulette`` (unbiased: ``n_exact_terms`` plus a ``roulette``-distributed number more) or
    ``exact`` (brute force, low dimensions). ``gradient``: ``neumann`` (the default: memory-saving and
    faster, the same expected gradient) or ``backprop`` through the series (the paper's formulation).
    ``n_probes`` Hutchinson probes of kind ``probe``.
    """

    estimator: str = "power_series"
    n_terms: int = 5
    n_exact_terms: int = 2
    roulette: str = "geometric"
    roulette_p: float = 0.5
    roulette_rate: float = 2.0
    gradient: str = "neumann"  # same expected gradient as backprop, faster and without a graph per term
    n_probes: int = 1
    probe: str = "gaussian"

    def training_estimator(self) -> LogDetEstimator:
        """The estimator these options name (the library validates every option, with a clear message)."""
        if self.estimator == "exact":
            return make_estimator("exact")
        series = dict(n_probes=self.n_probes, probe=self.probe, gradient=self.gradient)
        if self.estimator == "power_series":
            return make_estimator("power_series", n_terms=self.n_terms, **series)
        if self.estimator == "russian_roulette":
            return make_estimator(
                "russian_roulette",
                n_exact_terms=self.n_exact_terms,
                distribution=self.roulette,
                p=self.roulette_p,
                rate=self.roulette_rate,
                **series,
            )
        return make_estimator(self.estimator)  # raises, naming the estimators there are


@dataclass(frozen=True)
class InverseOptions:
    """How a run inverts its blocks (reconstructions, samples): fields of the density and classify configs."""

    inverse_tol: float = 1e-6  # atol = rtol on the per-sample residual
    inverse_method: str = "plain"  # or "anderson" (same tolerance, fewer evaluations of g)

    def inverse_config(self) -> FixedPointConfig:
        """The inverse's settings (validated by :class:`FixedPointConfig`)."""
        if not self.inverse_tol > 0:
            raise ValueError(f"inverse_tol must be > 0, got {self.inverse_tol}")
        return FixedPointConfig(
            atol=self.inverse_tol, rtol=self.inverse_tol, max_iterations=200, method=self.inverse_method
        )


def fill_from_architecture(cfg: Any, arch: Any) -> None:
    """Set every field of the frozen ``cfg`` that is ``None`` and that the architecture ``arch`` has to its value."""
    for f in fields(cfg):
        if getattr(cfg, f.name) is None and hasattr(arch, f.name):
            object.__setattr__(cfg, f.name, getattr(arch, f.name))


def architecture_of(cfg: Any, preset: Any, **fixed: Any) -> Any:
    """The model preset ``preset`` with every field the config also has set to the config's value."""
    names = {f.name for f in fields(preset)} & {f.name for f in fields(cfg)}
    return replace(preset, **{name: getattr(cfg, name) for name in names}, **fixed)


def check_at_least(cfg: Any, minimum: int, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(cfg, name)}")


def check_finite(cfg: Any) -> None:
    """Every float option of ``cfg`` is a finite number (``inf`` passes ``> 0`` checks, NaN every comparison)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


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
    """The checks every run's config makes: finite floats, a non-negative seed, a usable checkpoint directory."""
    check_finite(cfg)
    if getattr(cfg, "seed", 0) < 0:
        raise ValueError(f"seed must be >= 0 (it seeds torch, numpy and Python alike), got {cfg.seed}")
    if hasattr(cfg, "checkpoint_dir"):
        check_directory_usable(cfg.checkpoint_dir, "checkpoint_dir")


def entry_point_module(config_cls: type) -> str:
    """The module of an entry point's config (``experiments.density``), also when it runs as ``__main__``."""
    module = config_cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else "experiments"
    return module


# --- the command line ---------------------------------------------------------------------------
def _option_type(hint: Any) -> type:
    """``int`` for ``int | None``, ``tuple`` for ``tuple[int, ...]``: the type an option's text is parsed to."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    kind = typing.get_origin(hint) or hint
    return kind if kind in (int, float, bool, tuple) else str


def _parse_option(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text == "":  # an unset MLflow parameter; "none" is a real value (e.g. --pruner none)
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        if kind is tuple:
            return tuple(int(t) for t in text.replace(",", " ").split())
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser(config_cls: type, presets: dict[str, dict] | None, description: str | None) -> argparse.ArgumentParser:
    """``--preset`` (where the entry point has presets) and one ``--field-name`` per config field."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", default="quick", choices=sorted(presets))
    hints = typing.get_type_hints(config_cls)
    for f in fields(config_cls):
        if f.name != "preset":
            kind = _parse_option(_option_type(hints[f.name]))
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None)
    return parser


def config_from_preset(config_cls: type[C], presets: dict[str, dict], preset: str, **overrides: Any) -> C:
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    return config_cls(**{**presets[preset], **overrides, "preset": preset})


def config_for_resume(config_cls: type[C], run_id: str, **overrides: Any) -> C:
    """The configuration a run was started with, read from its checkpoint.

    Only ``epochs`` (to extend a run), ``device``, ``progress`` and ``checkpoint_dir`` may change;
    anything else would no longer be the same run.
    """
    unknown = set(overrides) - set(RESUME_OVERRIDABLE)
    if unknown:
        raise ValueError(f"a resumed run keeps its configuration; cannot change {sorted(unknown)} on resume")
    checkpoint_dir = overrides.get("checkpoint_dir", config_cls.checkpoint_dir)  # type: ignore[attr-defined]
    path = Path(str(checkpoint_dir)) / run_id / "last.pt"
    if not path.exists():
        raise ValueError(f"cannot resume run {run_id}: no checkpoint at {path}")
    checkpoint = load_checkpoint(path)
    expected = entry_point_module(config_cls)
    started_by = checkpoint.get("entry_point")  # recorded since this check exists
    foreign = sorted(set(checkpoint["config"]) - {f.name for f in fields(config_cls)})  # type: ignore[arg-type]
    name = expected.rsplit(".", 1)[-1]
    if started_by and started_by != expected:
        raise ValueError(
            f"run {run_id} was not started by {name} but by {started_by.rsplit('.', 1)[-1]}; resume it with "
            f"python -m {started_by} --resume {run_id}"
        )
    if not started_by and foreign:  # a checkpoint from before the entry point was recorded
        raise ValueError(
            f"run {run_id} was not started by {name} (its options {', '.join(foreign[:4])} are not {name}'s); resume "
            "it with the entry point that started it"
        )
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["config"].items()}
    # fields added since the run started: the values that reproduce it, not today's preset
    saved = {**getattr(config_cls, "BEFORE_FIELD_EXISTED", {}), **saved}
    epochs = overrides.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise ValueError(f"cannot shorten a run on resume ({saved['epochs']} epochs were configured)")
    if checkpoint["epoch"] >= epochs and run_status(run_id) == "FINISHED":
        raise ValueError(
            f"run {run_id} already FINISHED all {checkpoint['epoch']} epochs; resuming it would log its final "
            f"metrics and model again. Pass --epochs N with N > {checkpoint['epoch']} to train it further"
        )
    return cast(C, replace(cast(Any, config_cls(**saved)), resume=run_id, **overrides))


def parse_config(
    config_cls: type[C], presets: dict[str, dict] | None, argv: list[str] | None, description: str | None
) -> C:
    """The config the command line asks for: a preset with overrides, a resumed run's, or (no presets) the fields."""
    args = vars(build_parser(config_cls, presets, description).parse_args(argv))
    preset = args.pop("preset", None)
    overrides = {k: v for k, v in args.items() if v is not None}
    resume = overrides.pop("resume", None)
    if resume:
        return config_for_resume(config_cls, resume, **overrides)
    if presets:
        return config_from_preset(config_cls, presets, preset, **overrides)
    return config_cls(**overrides)
