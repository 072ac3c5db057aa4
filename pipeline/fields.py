"""Dataclass fields that carry their own one-line help text, and when they apply.

A configuration dataclass declares each field once, with ``documented(default, "help")``: the command line's
``--help``, the MLproject's comments and the docs read the text from there (:func:`field_help`), so it cannot drift
from the field. ``applies`` says when a field matters (``fc_hidden`` only with ``fc_blocks > 0``): a tracked run
logs only the fields that apply to it (:func:`applies`), so a parameter in the MLflow UI always changed something.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

Condition = Callable[[Mapping[str, Any]], bool]  # over the configuration's flat values (field name -> value)


def documented(default: Any, help: str, *, applies: Condition | None = None) -> Any:
    """A field with default ``default``, the one-line ``help`` (its unit or range), and optionally ``applies``."""
    if not help or "\n" in help:
        raise ValueError(f"a field's help is one non-empty line, got {help!r}")
    return dataclasses.field(default=default, metadata={"help": help, "applies": applies})


def when(name: str, *values: Any) -> Condition:
    """``applies`` for a field that matters only while field ``name`` is one of ``values``."""
    return lambda options: options.get(name) in values


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text (``""`` where none was declared), for a dataclass and its bases."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _condition(cls: type, name: str) -> Condition | None:
    """Field ``name``'s ``applies`` (None where it always applies, or ``cls`` has no such field)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    return field.metadata.get("applies") if field is not None else None


def conditional(cls: type, name: str) -> bool:
    """Whether field ``name`` of ``cls`` matters only in some configurations (it declares ``applies``)."""
    return _condition(cls, name) is not None


def applies(cls: type, name: str, options: Mapping[str, Any]) -> bool:
    """Whether field ``name`` of ``cls`` matters for a configuration with these flat ``options``."""
    condition = _condition(cls, name)
    return condition is None or bool(condition(options))
