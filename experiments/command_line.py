"""The entry points' command line: one ``--option-name`` per declared option, in ``--help`` sections by group.

:func:`parse_config` turns ``argv`` into a config: a preset with overrides, or a resumed run's configuration
(:func:`experiments.config.config_for_resume`). ``mlflow run`` passes an undeclared ``-P`` as ``--NAME VALUE`` with
the parameter's own name; :func:`dashed_options` accepts it.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, NoReturn, TypeVar

from experiments.config import (
    config_for_resume,
    config_from_preset,
    entry_point_module,
    flat_options,
    option_groups,
    option_help,
    option_text,
    option_types,
    ordered_options,
    warn_inapplicable,
)
from experiments.options import ArchitectureOptions

C = TypeVar("C")


def option_type(hint: Any) -> type:
    """``int`` for ``int | None``, ``tuple`` for ``tuple[int, ...]`` (also in a union, ``int | tuple[int, ...]``):
    the type an option's text is parsed to."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = next((arg for arg in args if (typing.get_origin(arg) or arg) is tuple), args[0])
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


class _ChosenOnce(argparse.Action):
    """``--preset``, refused a second time: under ``mlflow run`` a ``-P preset=...`` arrives after the entry point's
    own ``--preset`` and every other option already carries the entry point's preset's value."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, "_preset_given", False):
            parser.error(
                f"the preset was chosen twice ({namespace.preset}, then {values}); with mlflow run, choose it by the "
                f"entry point (-e {getattr(self, 'entry', '<entry>')}-{values}), not by -P preset"
            )
        namespace._preset_given = True
        setattr(namespace, self.dest, values)


DEFAULT_PRESET = "quick"


class CommandLineError(SystemExit):
    """argparse's refusal of a command line (exit 2, its message on stderr as argparse prints it), carrying the
    message: under ``mlflow run`` the launched run records it as its failure reason."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        text = f"{self.prog}: error: {message}"
        sys.stderr.write(text + "\n")
        raise CommandLineError(text)


def build_parser(config_cls: type, presets: dict[str, dict] | None, description: str | None) -> argparse.ArgumentParser:
    """``--preset`` (where the entry point has presets) and one ``--option-name`` per option, grouped as declared,
    each with its help text and the value it takes unset (the default preset's, or the field's default)."""
    module = entry_point_module(config_cls)
    parser = _ArgumentParser(
        prog=f"python -m {module}",
        usage=f"python -m {module}{' [--preset PRESET]' if presets else ''} [--OPTION VALUE ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if presets:
        chosen = parser.add_argument(
            "--preset",
            default=DEFAULT_PRESET,
            choices=sorted(presets),
            action=_ChosenOnce,
            help=f"the preset every unset option takes its value from (default: {DEFAULT_PRESET})",
        )
        chosen.entry = entry_point_module(config_cls).rsplit(".", 1)[-1]  # type: ignore[attr-defined]
    groups: dict[str, argparse._ArgumentGroup] = {}
    option_group, hints, helps = option_groups(config_cls), option_types(config_cls), option_help(config_cls)
    defaults = flat_options(config_from_preset(config_cls, presets, DEFAULT_PRESET if presets else None))
    label = f"{DEFAULT_PRESET} preset" if presets else "default"
    for name in ordered_options(config_cls):
        hint = hints[name]
        if name == "preset":
            continue
        group = option_group[name]
        if group not in groups:
            title = "model (fields of the architecture preset)" if group == ArchitectureOptions.GROUP else group
            groups[group] = parser.add_argument_group(title)
        kind = _parse_option(option_type(hint))
        unset = "unset" if defaults[name] is None else option_text(defaults[name])
        text = f"{helps[name]} [{label}: {unset}]".replace("%", "%%")  # argparse formats help with %
        groups[group].add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text)
    return parser


def dashed_options(argv: list[str]) -> list[str]:
    """``--n_terms 3`` as ``--n-terms 3``: ``mlflow run`` passes a ``-P`` that its entry point does not declare as
    ``--NAME VALUE``, with the parameter's own name."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def parse_config(
    config_cls: type[C], presets: dict[str, dict] | None, argv: list[str] | None, description: str | None
) -> C:
    """The config the command line asks for: a preset with overrides, a resumed run's, or (no presets) the fields."""
    argv = dashed_options(sys.argv[1:] if argv is None else list(argv))
    args = vars(build_parser(config_cls, presets, description).parse_args(argv))
    args.pop("_preset_given", None)
    preset = args.pop("preset", None)
    overrides = {k: v for k, v in args.items() if v is not None}
    resume = overrides.pop("resume", None)
    if resume:
        return config_for_resume(config_cls, resume, **overrides)
    cfg = config_from_preset(config_cls, presets, preset, **overrides)
    warn_inapplicable(cfg, overrides)
    return cfg
