"""Setting one attribute on many objects for the duration of a block (then each object's own value again)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def temporarily_set(objects: Sequence[Any], name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for every object within the block; each object's previous value is restored on exit,
    also on an error."""
    previous = [getattr(obj, name) for obj in objects]
    for obj in objects:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, own in zip(objects, previous, strict=True):
            setattr(obj, name, own)
