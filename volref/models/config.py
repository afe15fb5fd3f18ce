"""Checks shared by the model configs: every field of the declared type, inside its range.

A config is read from a checkpoint's card (JSON a user may have edited), so ``"width": "128"``,
``"patch": 0`` or ``"width": 10**9`` must be refused with one line before a layer is built, not
surface as a ``ZeroDivisionError`` or an allocation of terabytes. Each config's
``__post_init__`` calls :func:`check_fields` with its ranges.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def check_fields(config: Any, limits: Mapping[str, tuple[float, float]]) -> None:
    """Raise ``ValueError`` unless every field of the dataclass ``config`` has its declared type
    (``int``: an integer, not a bool; ``float``: a finite number) and lies in ``limits[name]``
    (inclusive) where a limit is given."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if f.name in limits:
            lo, hi = limits[f.name]
            if not lo <= value <= hi:
                raise ValueError(f"{f.name} must be in [{lo}, {hi}], got {value!r}")


def check_tiles(tile: int, patch: int, multiple: int = 1) -> None:
    """A tile made of whole patches, and a multiple of ``multiple`` (a network's stride)."""
    if tile % patch:
        raise ValueError(f"tile {tile} is not a multiple of patch {patch}")
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of {multiple}")
