"""OME-NGFF multiscale metadata, versions 0.4 (zarr v2) and 0.5 (zarr v3): read, check, build.

volref parses the metadata itself, leniently where the spec allows and with one clear message
where it cannot go on; ome-zarr-models validates what volref writes (see :func:`validate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import zarr

from volref.errors import InvalidMetadataError, NotOmeZarrError
from volref.io.store import check_name, member

VERSIONS = ("0.4", "0.5")


@dataclass(frozen=True)
class Axis:
    """One axis of a multiscale image: its name, NGFF type and unit."""

    name: str
    type: str | None = None
    unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The axis as NGFF metadata (``type`` and ``unit`` only when set)."""
        out: dict[str, Any] = {"name": self.name}
        if self.type is not None:
            out["type"] = self.type
        if self.unit is not None:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class Level:
    """One resolution level: its array path, shape, chunks, dtype and transform."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]
    translation: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Multiscale:
    """A parsed ``multiscales`` entry: NGFF version, zarr format, axes and levels."""

    version: str
    zarr_format: Literal[2, 3]
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]
    name: str | None = None

    @property
    def ndim(self) -> int:
        """Number of axes (3 to 5)."""
        return len(self.axes)

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Axis names in storage order (``("z", "y", "x")`` for a z-stack)."""
        return tuple(a.name for a in self.axes)


def ome_attributes(group: zarr.Group) -> tuple[str | None, dict[str, Any]]:
    """The OME attributes of a group and their version (``None`` if it has none).

    NGFF 0.5 nests everything under ``"ome"``; 0.4 keeps it at the top with a version per entry.
    """
    attrs: dict[str, Any] = dict(group.attrs)
    if isinstance(attrs.get("ome"), dict):
        ome = attrs["ome"]
        return str(ome.get("version", "0.5")), ome
    for key in ("multiscales", "labels", "image-label", "plate", "well"):
        if key in attrs:
            entry = attrs[key]
            version = None
            if key == "multiscales" and isinstance(entry, list) and entry and isinstance(entry[0], dict):
                version = entry[0].get("version")
            elif key == "image-label" and isinstance(entry, dict):
                version = entry.get("version")
            return (str(version) if version is not None else "0.4"), attrs
    return None, {}


def read_multiscale(group: zarr.Group, where: str = "") -> Multiscale:
    """Parse and check the first multiscale of an image group."""
    version, ome = ome_attributes(group)
    label = where or str(group.store_path)
    if version is None or "multiscales" not in ome:
        if "bioformats2raw.layout" in ome or "bioformats2raw.layout" in dict(group.attrs):
            raise NotOmeZarrError(
                f"{label} is a bioformats2raw collection; open one of its images (e.g. {label}/0)")
        raise NotOmeZarrError(f"{label} has no OME-Zarr 'multiscales' metadata")
    if version not in VERSIONS:
        raise InvalidMetadataError(
            f"{label}: OME-Zarr version {version} is not supported (volref reads 0.4 and 0.5)")
    entries = ome["multiscales"]
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise InvalidMetadataError(f"{label}: 'multiscales' must be a non-empty list of objects")
    ms = entries[0]
    axes = _parse_axes(ms.get("axes"), label)
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise InvalidMetadataError(f"{label}: multiscales has no 'datasets'")
    global_scale, global_translation = _parse_transforms(
        ms.get("coordinateTransformations"), len(axes), label, required=False)
    levels = []
    for i, ds in enumerate(datasets):
        if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
            raise InvalidMetadataError(f"{label}: dataset {i} has no 'path'")
        path = ds["path"]
        for part in path.split("/"):
            check_name(part)
        scale, translation = _parse_transforms(
            ds.get("coordinateTransformations"), len(axes), f"{label}/{path}", required=True)
        if scale is None:  # required=True has refused it already
            raise InvalidMetadataError(f"{label}/{path}: no 'scale' transformation")
        if global_scale is not None:
            scale = tuple(a * b for a, b in zip(scale, global_scale))
        if global_translation is not None:
            translation = tuple(a + b for a, b in zip(translation or (0.0,) * len(axes),
                                                      global_translation))
        try:
            array = member(group, path, label)
        except KeyError:
            raise InvalidMetadataError(f"{label}: level {path!r} is listed but missing") from None
        if not isinstance(array, zarr.Array):
            raise InvalidMetadataError(f"{label}: level {path!r} is a group, not an array")
        if array.ndim != len(axes):
            raise InvalidMetadataError(
                f"{label}: level {path!r} has {array.ndim} dimensions but {len(axes)} axes "
                f"({', '.join(a.name for a in axes)})")
        levels.append(Level(path=path, shape=tuple(array.shape), chunks=tuple(array.chunks),
                            dtype=str(array.dtype), scale=scale, translation=translation))
    for prev, cur in zip(levels, levels[1:]):
        if any(c > p for c, p in zip(cur.shape, prev.shape)):
            raise InvalidMetadataError(
                f"{label}: level {cur.path!r} {cur.shape} is larger than {prev.path!r} {prev.shape}")
    name = ms.get("name")
    return Multiscale(version=version, zarr_format=group.metadata.zarr_format, axes=axes,
                      levels=tuple(levels), name=name if isinstance(name, str) else None)


def _parse_axes(raw: Any, label: str) -> tuple[Axis, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidMetadataError(f"{label}: multiscales has no 'axes' list")
    axes = []
    for a in raw:
        if isinstance(a, str):  # NGFF 0.3 style
            raise InvalidMetadataError(
                f"{label}: axes are plain strings (NGFF 0.3); volref reads 0.4 and 0.5")
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise InvalidMetadataError(f"{label}: every axis needs a 'name'")
        t = a.get("type")
        if t is not None and not isinstance(t, str):
            raise InvalidMetadataError(f"{label}: axis {a['name']!r} has a non-text type")
        unit = a.get("unit")
        axes.append(Axis(name=a["name"], type=t, unit=unit if isinstance(unit, str) else None))
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InvalidMetadataError(f"{label}: duplicate axis names {names}")
    if not 2 <= len(axes) <= 5:
        raise InvalidMetadataError(f"{label}: {len(axes)} axes; OME-Zarr images have 2 to 5")
    return tuple(axes)


def _parse_transforms(raw: Any, ndim: int, label: str, required: bool
                      ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if raw is None:
        if required:
            raise InvalidMetadataError(f"{label}: no coordinateTransformations")
        return None, None
    if not isinstance(raw, list):
        raise InvalidMetadataError(f"{label}: coordinateTransformations must be a list")
    scale: tuple[float, ...] | None = None
    translation: tuple[float, ...] | None = None
    for t in raw:
        if not isinstance(t, dict):
            raise InvalidMetadataError(f"{label}: a coordinate transformation is not an object")
        kind = t.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise InvalidMetadataError(f"{label}: unsupported transformation type {kind!r}")
        values = t.get(kind)
        if values is None and "path" in t:
            raise InvalidMetadataError(f"{label}: transformations stored by 'path' are not supported")
        if (not isinstance(values, list) or len(values) != ndim
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise InvalidMetadataError(
                f"{label}: {kind} must be {ndim} finite numbers (one per axis), got {values!r}")
        if kind == "scale":
            if any(v <= 0 for v in values):
                raise InvalidMetadataError(f"{label}: scale values must be > 0, got {values}")
            scale = tuple(float(v) for v in values)
        else:
            translation = tuple(float(v) for v in values)
    if required and scale is None:
        raise InvalidMetadataError(f"{label}: no 'scale' transformation")
    return scale, translation


# ---------------------------------------------------------------- building metadata to write


def multiscales_entry(version: str, axes: tuple[Axis, ...], levels: list[Level],
                      name: str | None, method: str) -> dict[str, Any]:
    """One ``multiscales`` entry in the layout of ``version``."""
    datasets = []
    for lv in levels:
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(lv.scale)}]
        if lv.translation is not None and any(lv.translation):
            transforms.append({"type": "translation", "translation": list(lv.translation)})
        datasets.append({"path": lv.path, "coordinateTransformations": transforms})
    entry: dict[str, Any] = {
        "axes": [a.to_dict() for a in axes],
        "datasets": datasets,
        "type": method,
        "metadata": {"method": f"volref {method} downsampling"},
    }
    if name:
        entry["name"] = name
    if version == "0.4":
        entry["version"] = "0.4"
    return entry


def set_ome(group: zarr.Group, version: str, key: str, value: Any) -> None:
    """Write one OME key (``multiscales``, ``labels``, ``image-label``) in the version's layout."""
    attrs: dict[str, Any] = dict(group.attrs)
    if version == "0.5":
        current = attrs.get("ome", {})
        if not isinstance(current, dict):
            raise InvalidMetadataError(
                f"the 'ome' attribute of {group.path or 'the root group'} is not an object; "
                "volref does not replace it")
        ome = dict(current)
        ome["version"] = "0.5"
        ome[key] = value
        group.attrs["ome"] = ome
    else:
        if key == "image-label":
            value = {"version": "0.4", **value}
        group.attrs[key] = value


def level_paths(version: str, n: int) -> list[str]:
    """``s0, s1, …`` for NGFF 0.5 (ome-zarr-py's current names), ``0, 1, …`` for 0.4."""
    return [f"s{i}" if version == "0.5" else str(i) for i in range(n)]
