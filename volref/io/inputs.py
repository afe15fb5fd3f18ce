"""Arrays another tool wrote beside the image: a label image (``labels/NAME``) or an uncertainty
image (any multiscale image in the archive), checked against the image volref processes.

Only the finest level is read, whatever levels, chunks or dtype the other tool chose; its z, y
and x must be the image's. Leading axes must have one element, except the channel axis of an
uncertainty image, which may hold one probability per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import zarr

from volref.errors import UnsupportedImageError, VolrefError
from volref.io.image import SPATIAL, label_names
from volref.io.ngff import read_multiscale
from volref.io.store import array_at, member
from volref.layout import label_path


class InputNotFound(VolrefError, LookupError):
    """An input named on the command line is in none of the stores searched."""


@dataclass(frozen=True)
class StoredInput:
    """The finest level of an input image and how to index it down to ``(z, y, x)``.

    ``lead`` indexes the leading axes (0 for each, a whole slice for a channel axis of class
    probabilities, whose position among the kept axes is ``channel_axis``). ``coarsest``: the
    coarsest level (the finest when there is one), for a quick look at the values.
    """

    array: zarr.Array
    lead: tuple[int | slice, ...]
    where: str
    coarsest: zarr.Array
    channel_axis: int | None = None


def find_label_image(stores: Sequence[tuple[zarr.Group, str]], name: str,
                     shape: tuple[int, int, int]) -> StoredInput:
    """The label image ``name`` of the first of ``stores`` (group, its name for messages) that
    lists it in its ``labels`` group."""
    seen: list[str] = []
    for group, store in stores:
        names = label_names(group)
        if name in names:
            path = label_path(name)
            return _finest(member(group, path), f"{store}: {path}", shape, channels=False)
        seen.extend(n for n in names if n not in seen)
    where = " or ".join(s for _, s in stores)
    raise InputNotFound(f"{where} has no label image {name!r} (label images: "
                        f"{', '.join(seen) or 'none'})")


def find_image(stores: Sequence[tuple[zarr.Group, str]], path: str,
               shape: tuple[int, int, int]) -> StoredInput:
    """The multiscale image at ``path`` below the first of ``stores`` that holds it; a channel
    axis of two or more elements is kept (class probabilities)."""
    for group, store in stores:
        try:
            node = member(group, path)
        except KeyError:
            continue
        if not isinstance(node, zarr.Group):
            raise UnsupportedImageError(f"{store}: {path} is an array; give the path of its "
                                        "multiscale image (the group above it)")
        return _finest(node, f"{store}: {path}", shape, channels=True)
    where = " or ".join(s for _, s in stores)
    raise InputNotFound(f"{where} has no image {path!r}")


def _finest(group: zarr.Group, where: str, shape: tuple[int, int, int],
            channels: bool) -> StoredInput:
    ms = read_multiscale(group, where=where)
    names = [a.name.lower() for a in ms.axes]
    if ms.ndim < 3 or tuple(names[-3:]) != SPATIAL:
        raise UnsupportedImageError(f"{where}: axes ({', '.join(ms.axis_names)}) do not end "
                                    "in z, y, x")
    level = ms.levels[0]
    array = array_at(group, level.path)
    if tuple(array.shape[-3:]) != tuple(shape):
        raise UnsupportedImageError(
            f"{where}: its finest level is {' x '.join(map(str, array.shape[-3:]))} voxels but "
            f"the image is {' x '.join(map(str, shape))}: volref reads the finest level, which "
            "must match the image voxel for voxel")
    lead: list[int | slice] = []
    channel_axis = None
    for axis, size in zip(ms.axes[:-3], array.shape[:-3]):
        is_channel = axis.type == "channel" or (axis.type is None and axis.name.lower() == "c")
        if channels and is_channel and size > 1 and channel_axis is None:
            channel_axis = 0
            lead.append(slice(None))
        elif size == 1:
            lead.append(0)
        else:
            raise UnsupportedImageError(f"{where}: axis {axis.name!r} has {size} elements; "
                                        "volref reads inputs with one" +
                                        (" (or class probabilities along one channel axis)"
                                         if channels else ""))
    coarsest = array_at(group, ms.levels[-1].path)
    return StoredInput(array, tuple(lead), where, coarsest, channel_axis)
