"""What every settings dataclass shares: its dict, read back, and its field defaults.

Settings are frozen dataclasses and the one place their defaults are stated: the command line
takes its option defaults from them (:func:`default_of`), and a stage's manifest digest is made
from :meth:`Settings.to_dict`, which lists every field by itself — a field added to a class
changes the digest, so a resumed run never reuses output made without it. A value a field
cannot take raises :class:`~volref.errors.SettingsError` naming the field (the command line
names the flag).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from volref.errors import ConfigError

S = TypeVar("S", bound="Settings")

#: the numbers models compute in (:mod:`volref.models.precision` maps them to dtypes); ``auto``:
#: bf16 where the hardware multiplies it natively (GPUs, CPUs with AVX-512 BF16 or AMX), else fp32
AUTO = "auto"
PRECISIONS = (AUTO, "bf16", "fp32")


class Settings:
    """Mixin for frozen dataclasses: ``to_dict`` from every field, ``from_dict`` back."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, by name, in declaration order (nested settings as dicts)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """The settings of ``data`` (as :meth:`to_dict` wrote them); unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (for command-line option defaults)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ConfigError(f"{cls.__name__}.{name} has no default")
    raise ConfigError(f"{cls.__name__} has no field {name!r}")
