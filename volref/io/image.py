"""Open an OME-Zarr image as the 3-D ``(z, y, x)`` volume volref works on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import zarr

from volref.errors import ImageDataError, UnsupportedImageError, VolrefError
from volref.io.ngff import Multiscale, ome_attributes, read_multiscale
from volref.io.store import array_at, member, open_group, raise_if_connection_lost, redact

#: dtypes volref processes; images of other integer and float types are refused with a reason.
SUPPORTED_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32",
                    "float64")
SPATIAL = ("z", "y", "x")


@dataclass(frozen=True)
class Volume:
    """One level of an OME-Zarr image reduced to ``(z, y, x)``.

    Attributes
    ----------
    data
        Lazy ``(z, y, x)`` array, chunked like the stored array.
    scale, translation, units
        Physical voxel size, origin and units of the three spatial axes.
    multiscale
        Everything the metadata says (all axes, every level).
    selection
        The index chosen on each non-spatial axis (``{"c": 1}``), empty for a 3-D image.
    """

    location: str
    group: zarr.Group = field(repr=False)
    multiscale: Multiscale
    level: int
    data: da.Array = field(repr=False)
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    units: tuple[str | None, str | None, str | None]
    selection: dict[str, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` voxels."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The pixel type as stored."""
        dtype: np.dtype[Any] = np.dtype(self.data.dtype)
        return dtype


def open_multiscale(location: str | os.PathLike[str],
                    storage_options: dict[str, Any] | None = None) -> tuple[zarr.Group, Multiscale]:
    """Open an image group read-only and parse its multiscale metadata."""
    group = open_group(location, mode="r", storage_options=storage_options)
    return group, read_multiscale(group, where=redact(location))


def open_image(location: str | os.PathLike[str], *, channel: int | None = None,
               timepoint: int | None = None, level: int = 0,
               storage_options: dict[str, Any] | None = None) -> Volume:
    """Open ``location`` (path or URL) read-only as a ``(z, y, x)`` volume.

    Channel and time axes of size 1 are dropped; larger ones need ``channel``/``timepoint``.
    Raises :class:`~volref.errors.UnsupportedImageError` for images volref cannot process.
    """
    group, ms = open_multiscale(location, storage_options)
    return select_volume(group, ms, redact(location), channel=channel, timepoint=timepoint,
                         level=level)


def select_volume(group: zarr.Group, ms: Multiscale, label: str, *, channel: int | None = None,
                  timepoint: int | None = None, level: int = 0) -> Volume:
    """Reduce a parsed multiscale image to the ``(z, y, x)`` volume of one level."""
    if not 0 <= level < len(ms.levels):
        raise UnsupportedImageError(f"{label} has {len(ms.levels)} levels; level {level} does not exist")
    lv = ms.levels[level]
    names = [a.name.lower() for a in ms.axes]
    spatial = [i for i, a in enumerate(ms.axes) if (a.type == "space" or
                                                    (a.type is None and names[i] in SPATIAL))]
    if len(spatial) != 3:
        shown = ", ".join(ms.axis_names[i] for i in spatial) or "none"
        raise UnsupportedImageError(
            f"{label}: volref needs a 3-D z-stack (z, y, x); this image has {len(spatial)} "
            f"spatial axes ({shown})")
    if tuple(names[i] for i in spatial) != SPATIAL:
        raise UnsupportedImageError(
            f"{label}: spatial axes are ({', '.join(ms.axis_names[i] for i in spatial)}); "
            "volref expects them named and ordered z, y, x")
    if spatial != list(range(ms.ndim - 3, ms.ndim)):
        raise InvalidAxisOrder(label, ms)

    array = array_at(group, lv.path)
    index: list[int | slice] = []
    selection: dict[str, int] = {}
    wanted = {"channel": channel, "time": timepoint}
    used = {"channel": False, "time": False}
    for i, axis in enumerate(ms.axes):
        if i in spatial:
            index.append(slice(None))
            continue
        kind = axis.type or ("time" if names[i] == "t" else "channel" if names[i] == "c" else None)
        if kind not in ("channel", "time"):
            raise UnsupportedImageError(f"{label}: axis {axis.name!r} of type {axis.type!r} is not "
                                        "supported (volref reads time, channel and space axes)")
        size = lv.shape[i]
        choice = wanted[kind]
        flag = "--channel" if kind == "channel" else "--timepoint"
        if choice is None:
            if size != 1:
                raise UnsupportedImageError(
                    f"{label}: the image has {size} {kind}s (axis {axis.name!r}); "
                    f"choose one with {flag} N (0..{size - 1})")
            choice = 0
        if not 0 <= choice < size:
            raise UnsupportedImageError(
                f"{label}: {flag} {choice} is out of range; axis {axis.name!r} has {size}")
        used[kind] = True
        index.append(choice)
        selection[axis.name] = choice
    for kind, choice in wanted.items():
        if choice is not None and not used[kind]:
            flag = "--channel" if kind == "channel" else "--timepoint"
            raise UnsupportedImageError(f"{label}: {flag} given but the image has no {kind} axis")

    dtype = np.dtype(array.dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise UnsupportedImageError(
            f"{label}: pixel type {dtype.name} is not supported "
            f"(volref reads {', '.join(SUPPORTED_DTYPES)})")
    data = da.from_zarr(array, chunks=array.chunks)[tuple(index)]
    axes3 = [ms.axes[i] for i in spatial]
    z, y, x = spatial
    translation = lv.translation or (0.0,) * ms.ndim
    return Volume(
        location=label,
        group=group,
        multiscale=ms,
        level=level,
        data=data,
        scale=(lv.scale[z], lv.scale[y], lv.scale[x]),
        translation=(translation[z], translation[y], translation[x]),
        units=(axes3[0].unit, axes3[1].unit, axes3[2].unit),
        selection=selection,
    )


def intensity_sample(volume: Volume, max_voxels: int = 4_000_000) -> np.ndarray:
    """A regular subsample of the volume's coarsest level (for intensity statistics)."""
    ms = volume.multiscale
    kinds = {a.name: (a.type or ("time" if a.name.lower() == "t" else "channel")) for a in ms.axes}
    kw = {("channel" if kinds[k] == "channel" else "timepoint"): v
          for k, v in volume.selection.items()}
    coarse = select_volume(volume.group, ms, volume.location, level=len(ms.levels) - 1, **kw)
    data = coarse.data
    step = max(1, int(np.ceil((data.size / max_voxels) ** (1 / 3))))
    return np.asarray(data[::step, ::step, ::step].compute(), dtype=np.float64)


#: a volume of at most this many voxels is sampled on a regular stride over all of it; a larger
#: one in a lattice of small boxes (reading a stride through an archive of 10^10 voxels would
#: read most of its chunks)
STRIDED_MAX_VOXELS = 2**28
#: the lattice: up to LATTICE boxes along each axis, each one plane of BOX_ROWS rows of BOX_WIDTH
LATTICE, BOX_ROWS, BOX_WIDTH = 5, 64, 512


def _starts(length: int, box: int, count: int) -> list[int]:
    return sorted({int(v) for v in np.linspace(0, length - box, min(count, length - box + 1))
                   .round()})


def background_sample(volume: Volume, max_voxels: int = 4_000_000) -> list[np.ndarray]:
    """Pieces of the volume's own level for background and noise statistics, placed by its
    shape alone: the same voxels whatever the storage chunks (a sample picked by chunks gave the
    same image stored in other chunks another intensity range, and other labels).

    Unlike :func:`intensity_sample` this reads the level that is processed, not the coarsest
    one: averaging into coarser levels lowers the noise. Rows run along x unbroken (the noise is
    measured between x-neighbours). Up to :data:`STRIDED_MAX_VOXELS` voxels, one piece: every
    ``step``-th plane and row with ``step`` the smallest stride that keeps within
    ``max_voxels``; beyond, a lattice of up to ``LATTICE**3`` one-plane boxes of
    ``BOX_ROWS x BOX_WIDTH`` spread evenly over the volume (what a piece reads stays bounded).
    """
    data = volume.data
    nz, ny, nx = (int(n) for n in data.shape)
    if nz * ny * nx <= STRIDED_MAX_VOXELS:
        step = max(1, int(np.ceil(np.sqrt(nz * ny * nx / max_voxels))))
        return [np.asarray(data[::step, ::step, :].compute())]
    by, bx = min(ny, BOX_ROWS), min(nx, BOX_WIDTH)
    boxes = [data[z, y:y + by, x:x + bx][None]
             for z in _starts(nz, 1, LATTICE) for y in _starts(ny, by, LATTICE)
             for x in _starts(nx, bx, LATTICE)]
    return [np.asarray(b) for b in da.compute(*boxes)]


def display_window(volume: Volume) -> tuple[float, float] | None:
    """``(start, end)`` of the image's ``omero`` display window for the selected channel, or
    None when the metadata has none (or it is not a valid window)."""
    _, ome = ome_attributes(volume.group)
    omero = ome.get("omero", volume.group.attrs.get("omero"))
    if not isinstance(omero, dict) or not isinstance(omero.get("channels"), list):
        return None
    channels = omero["channels"]
    names = [a.name for a in volume.multiscale.axes
             if (a.type == "channel" or (a.type is None and a.name.lower() == "c"))]
    index = volume.selection.get(names[0], 0) if names else 0
    if not 0 <= index < len(channels) or not isinstance(channels[index], dict):
        return None
    window = channels[index].get("window")
    try:
        start, end = float(window["start"]), float(window["end"])
    except (TypeError, KeyError, ValueError):
        return None
    return (start, end) if np.isfinite(start) and np.isfinite(end) and end > start else None


class InvalidAxisOrder(UnsupportedImageError):
    """The spatial axes of an image are not the last three, in z, y, x order."""

    def __init__(self, label: str, ms: Multiscale) -> None:
        super().__init__(f"{label}: spatial axes must come last, got ({', '.join(ms.axis_names)})")


def label_names(group: zarr.Group) -> list[str]:
    """Names listed in the image's ``labels`` group (empty when there is none)."""
    try:
        labels = member(group, "labels")
    except KeyError:
        return []
    if not isinstance(labels, zarr.Group):
        return []
    _, ome = ome_attributes(labels)
    names = ome.get("labels", [])
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn a chunk that cannot be read or decoded while reading ``what`` (a truncated or
    overwritten file, a codec error) into one :class:`ImageDataError` naming it. Wrap only the
    reads: errors of volref's own code around them must stay tracebacks."""
    try:
        yield
    except VolrefError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError, KeyError) as exc:
        raise_if_connection_lost(None, exc, what)
        detail = " ".join(str(exc).split())[:200]
        raise ImageDataError(f"cannot read {what}: a chunk is damaged or unreadable "
                             f"({type(exc).__name__}: {detail})") from None
