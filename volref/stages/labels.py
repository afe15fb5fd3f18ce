"""A segmentation volref did not make: its label values mapped to volref's four classes, and
its uncertainty brought to volref's normalised entropy in [0, 1].

The class map names each class of :mod:`volref.classes` once, with the label value(s) the other
tool gave it (``volref refine --class-map``)::

    background=0,ims=3,cristae=2,matrix=1          one value per class
    background=0+4+5,ims=3,cristae=2,matrix=1      several values merged into one class

Every other value is refused (:class:`UnmappedLabelError`): an unexpected value is more often a
wrong map than a class to drop, so values to drop go into ``background`` by name.

Pure numpy, no torch and no dask: the refine stage, training and tests call these functions on
arrays.
"""

from __future__ import annotations

import numpy as np

from volref.classes import CLASS_KEYS
from volref.errors import ImageDataError, SettingsError

#: values per class, in the order of :data:`volref.classes.CLASS_KEYS`
ClassTable = tuple[tuple[int, ...], ...]

#: volref's own values: class ``k`` is value ``k``
IDENTITY_MAP = ",".join(f"{k}={v}" for v, k in enumerate(CLASS_KEYS))


class UnmappedLabelError(ImageDataError):
    """A label image holds values the class map does not name."""


def parse_class_map(text: str) -> ClassTable:
    """The values of each class of a class map (see the module doc).

    Raises :class:`~volref.errors.SettingsError` (field ``class_map``) for an unknown class, a
    class named twice or not at all, a value that is not an integer or a value given twice.
    """
    def bad(message: str) -> SettingsError:
        return SettingsError("class_map", f"class map {text!r}: {message} (expected e.g. "
                             f"{IDENTITY_MAP}; a class may take several values, 0+4+5)")

    found: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for item in str(text).split(","):
        name, sep, values = (part.strip() for part in item.partition("="))
        name = name.lower()
        if not sep or not name or not values:
            raise bad(f"{item.strip()!r} is not CLASS=VALUE")
        if name not in CLASS_KEYS:
            raise bad(f"unknown class {name!r} (classes: {', '.join(CLASS_KEYS)})")
        if name in found:
            raise bad(f"{name} is named twice")
        try:
            ints = tuple(int(v.strip()) for v in values.split("+"))
        except ValueError:
            raise bad(f"{name}={values}: values must be integers") from None
        for v in ints:
            if v in owner:
                raise bad(f"value {v} is given to {owner[v]} and {name}")
            owner[v] = name
        found[name] = ints
    missing = [k for k in CLASS_KEYS if k not in found]
    if missing:
        raise bad(f"no value for {', '.join(missing)} (every class once)")
    return tuple(found[k] for k in CLASS_KEYS)


def format_class_map(table: ClassTable) -> str:
    """The canonical text of a class table (classes in volref's order)."""
    return ",".join(f"{k}={'+'.join(map(str, vals))}" for k, vals in zip(CLASS_KEYS, table))


def check_fits(table: ClassTable, dtype: np.dtype, where: str) -> None:
    """Refuse a map whose values a label image of ``dtype`` cannot hold (or a non-integer
    label image)."""
    dt = np.dtype(dtype)
    if dt.kind not in "uib":
        raise SettingsError("labels", f"{where} holds {dt.name} values: a label image holds "
                            "integers")
    lo, hi = (0, 1) if dt.kind == "b" else (np.iinfo(dt).min, np.iinfo(dt).max)
    out = sorted(v for vals in table for v in vals if not lo <= v <= hi)
    if out:
        raise SettingsError("class_map", f"class map value(s) {', '.join(map(str, out))} do not "
                            f"fit {where} ({dt.name}: {lo}..{hi})")


def to_classes(values: np.ndarray, table: ClassTable, where: str = "the labels") -> np.ndarray:
    """volref's classes (uint8) of a label array; :class:`UnmappedLabelError` names values the
    map does not name."""
    keys = np.array([v for vals in table for v in vals], dtype=np.int64)
    classes = np.array([k for k, vals in enumerate(table) for _ in vals], dtype=np.uint8)
    flat = values.astype(np.int64, copy=False).ravel()
    order = np.argsort(keys)
    keys, classes = keys[order], classes[order]
    pos = np.clip(np.searchsorted(keys, flat), 0, len(keys) - 1)
    hit = keys[pos] == flat
    if not hit.all():
        extra = np.unique(flat[~hit])
        shown = ", ".join(map(str, extra[:8])) + (" ..." if len(extra) > 8 else "")
        raise UnmappedLabelError(
            f"{where} holds value(s) {shown} that the class map ({format_class_map(table)}) does "
            "not name: give each to a class in --class-map (e.g. background=0+"
            f"{extra[0]})")
    out: np.ndarray = classes[pos].reshape(values.shape)
    return out


def normalised_entropy(p: np.ndarray, axis: int = 0) -> np.ndarray:
    """Entropy of class probabilities along ``axis``, divided by log(C): float32 in [0, 1].

    Each voxel's values are divided by their sum first (scores that do not sum to 1, integer
    probabilities); a voxel whose values are all 0 gets 0.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    c = p.shape[axis]
    if c < 2:
        raise ValueError("entropy needs at least two classes")
    total = p.sum(axis=axis, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    logs = np.log(q, out=np.zeros_like(q), where=q > 0)
    h = -(q * logs).sum(axis=axis) / np.log(c)
    out: np.ndarray = np.clip(h, 0.0, 1.0).astype(np.float32)
    return out


def to_uncertainty(values: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
    """Normalised entropy float32 in [0, 1] of a stored uncertainty.

    Without ``channel_axis``: the entropy itself, as floats in [0, 1] (clipped) or as unsigned
    integers scaled to their type's maximum (uint8: value / 255, how ``volref segment`` stores
    it). With it: per-class probabilities along that axis (:func:`normalised_entropy`).
    """
    if channel_axis is not None:
        return normalised_entropy(values, axis=channel_axis)
    dt = values.dtype
    if dt.kind == "u":
        scaled: np.ndarray = values.astype(np.float32) / np.float32(np.iinfo(dt).max)
        return scaled
    if dt.kind == "f":
        clipped: np.ndarray = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0)
        return clipped
    raise ImageDataError(f"an uncertainty image holds {dt.name} values: give floats in [0, 1], "
                         "unsigned integers (scaled to their maximum) or per-class probabilities")


#: how far float uncertainties or probabilities may stray outside [0, 1] (rounding) before
#: they are refused rather than clipped
SLACK = 1e-6


def check_uncertainty(values: np.ndarray, where: str, probabilities: bool = False) -> None:
    """Refuse an uncertainty (or, with ``probabilities``, per-class probabilities) that holds
    NaN or Inf, or floats outside [0, 1]: clipped, they would refine with a wrong confidence
    and no warning. Unsigned integers are scaled (or normalised) and always fit; a dtype
    :func:`to_uncertainty` cannot read is refused too."""
    what = "per-class probabilities" if probabilities else "an uncertainty"
    kind = values.dtype.kind
    if kind not in "fu" and not (probabilities and kind == "i"):
        raise ImageDataError(f"{where} holds {values.dtype.name} values: give floats in [0, 1], "
                             "unsigned integers (scaled to their maximum) or per-class "
                             "probabilities")
    if kind != "f" or values.size == 0:
        return
    if not np.isfinite(values).all():
        raise ImageDataError(f"{where} holds NaN or Inf values; {what} must be finite values "
                             "in [0, 1]")
    lo, hi = float(values.min()), float(values.max())
    if lo < -SLACK or hi > 1 + SLACK:
        raise ImageDataError(f"{where} holds values from {lo:g} to {hi:g}; {what} must lie in "
                             "[0, 1] (normalised entropy, or probabilities per class)")
