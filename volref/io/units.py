"""Physical lengths in micrometres, from the units an OME-Zarr image's axes declare.

NGFF names space units after UDUNITS-2 (``"nanometer"``, ``"millimeter"``, ...); every one of
them converts, and so do the spellings files carry in practice (``"nm"``, ``"µm"``, ``"um"``,
``"micron"``, British ``-metre``, plurals). volref's decisions, the same for every metric:

* a **missing** unit (NGFF makes it optional) is taken as micrometre — the unit volref's own
  phantoms and most microscopy exports use — and the assumption is logged and written into the
  metrics table's metadata (:func:`spacing_um` returns which axes were assumed);
* an **unknown** unit (``"pixel"``, a time unit on a space axis, a typo) cannot be converted:
  :class:`UnknownUnitError`, one line, before any work starts.
"""

from __future__ import annotations

import logging
from typing import Any

from volref.errors import UnsupportedImageError

log = logging.getLogger(__name__)

#: micrometres per unit, for every NGFF (UDUNITS-2) length unit
LENGTH_UNITS_UM: dict[str, float] = {
    "yoctometer": 1e-18, "zeptometer": 1e-15, "attometer": 1e-12, "femtometer": 1e-9,
    "picometer": 1e-6, "angstrom": 1e-4, "nanometer": 1e-3, "micrometer": 1.0,
    "millimeter": 1e3, "centimeter": 1e4, "decimeter": 1e5, "meter": 1e6, "hectometer": 1e8,
    "kilometer": 1e9, "megameter": 1e12, "gigameter": 1e15, "terameter": 1e18,
    "petameter": 1e21, "exameter": 1e24, "zettameter": 1e27, "yottameter": 1e30,
    "inch": 25_400.0, "foot": 304_800.0, "yard": 914_400.0, "mile": 1_609_344_000.0,
    "parsec": 3.0856775814913673e22,
}

#: symbols and spellings found in files, mapped to the NGFF names
ALIASES = {"ym": "yoctometer", "zm": "zeptometer", "am": "attometer", "fm": "femtometer",
           "pm": "picometer", "å": "angstrom", "nm": "nanometer",
           "µm": "micrometer", "μm": "micrometer", "um": "micrometer", "micron": "micrometer",
           "mm": "millimeter", "cm": "centimeter", "dm": "decimeter", "m": "meter",
           "km": "kilometer", "in": "inch", "ft": "foot", "yd": "yard", "mi": "mile",
           "pc": "parsec"}

ASSUMED = "micrometer"


class UnknownUnitError(UnsupportedImageError):
    """A space axis whose unit volref cannot convert to micrometres."""


def canonical(unit: str) -> str | None:
    """The NGFF name of ``unit`` (symbols, ``-metre`` and plurals accepted), or None."""
    text = unit.strip().lower().replace("metre", "meter")
    if text in LENGTH_UNITS_UM:
        return text
    if text in ALIASES:
        return ALIASES[text]
    if text.endswith("s") and text[:-1] in LENGTH_UNITS_UM:
        return text[:-1]
    if text in ("feet",):
        return "foot"
    if text.endswith("es") and text[:-2] in LENGTH_UNITS_UM:  # inches
        return text[:-2]
    return None


def spacing_um(scale: tuple[float, ...], units: tuple[str | None, ...], axes: str = "zyx",
               where: str = "the image") -> tuple[tuple[float, ...], dict[str, Any]]:
    """The voxel size in micrometres, and a record of how it was found.

    The record: ``{"units": {"z": "nanometer", ...}, "assumed": ["x"]}`` (``assumed``: the axes
    without a unit). Raises :class:`UnknownUnitError` for a unit that is not a length volref
    knows.
    """
    out, found, assumed = [], {}, []
    for axis, size, unit in zip(axes, scale, units):
        if unit is None or not str(unit).strip():
            name = ASSUMED
            assumed.append(axis)
        else:
            name = canonical(str(unit)) or ""
            if not name:
                known = ", ".join(sorted(LENGTH_UNITS_UM))
                raise UnknownUnitError(f"{where}: axis {axis!r} has unit {unit!r}, which is not "
                                       f"a length volref can convert to micrometres ({known}); "
                                       "fix the axis' unit in the image's metadata")
        found[axis] = name
        out.append(float(size) * LENGTH_UNITS_UM[name])
    if assumed:
        log.warning("%s: axes %s have no unit; taking them as micrometres", where,
                    ", ".join(assumed))
    return tuple(out), {"units": found, "assumed": assumed}
