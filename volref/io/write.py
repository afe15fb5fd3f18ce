"""Writing multiscale images and label images: metadata through volref's NGFF builder, validated
by ome-zarr-models; data through zarr, whole chunks at a time.

Every level is written by one ``da.store(lock=False)`` whose Dask chunks equal the zarr chunks, so
no two tasks ever write parts of the same chunk (partial writes without a lock lose data).
Level ``k`` is computed from level ``k-1`` as stored, not from the source graph, so expensive
sources (a phantom, a model) run once; :func:`store_pyramid` returns the whole sequence as one
lazy object that the caller computes (with a progress bar, on any scheduler).

Levels that volref makes halve y and x and keep z, as pan-ExM stacks are already coarser in z
(label images of another image follow that image's levels, whatever their factors)::

    s0  (z, y,    x   )  scale (sz, sy,  sx )
    s1  (z, y//2, x//2)  scale (sz, 2sy, 2sx)   image: mean of 2x2; labels: top-left voxel
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import dask
import dask.array as da
import numcodecs
import numpy as np
import numpy.typing as npt
import zarr
from dask.delayed import Delayed
from dask.graph_manipulation import bind
from zarr.codecs import BloscCodec

from volref.errors import OutputExistsError, VolrefError
from volref.io.ngff import (
    Axis,
    Level,
    Multiscale,
    level_paths,
    multiscales_entry,
    ome_attributes,
    set_ome,
)
from volref.io.store import check_name, has_member

log = logging.getLogger(__name__)

FACTORS = (1, 2, 2)


@dataclass(frozen=True)
class LabelInfo:
    """What a label image says about its values: colours and properties per label value.

    For class images list every class (napari hides values without a colour when some have
    one); for instance images leave ``colors`` empty.
    """

    colors: tuple[tuple[int, tuple[int, int, int, int]], ...] = ()
    properties: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The ``image-label`` metadata: source, colours, properties."""
        out: dict[str, Any] = {"source": {"image": "../../"}}
        if self.colors:
            out["colors"] = [{"label-value": v, "rgba": list(c)} for v, c in self.colors]
        if self.properties:
            out["properties"] = [dict(p) for p in self.properties]
        return out


def default_levels(shape: Sequence[int], min_size: int = 256) -> int:
    """Levels until y or x would drop under ``min_size`` (at least one)."""
    smallest, n = min(shape[-2:]), 1
    while smallest // 2**n >= min_size:
        n += 1
    return n


def pyramid_geometry(shape: Sequence[int], scale: Sequence[float], n_levels: int,
                     chunks: Sequence[int], dtype: npt.DTypeLike, version: str, translation: Sequence[float] | None = None,
                     method: str = "mean") -> list[Level]:
    """Shapes and transforms of a 3-D pyramid built by :func:`store_pyramid`."""
    paths = level_paths(version, n_levels)
    base_t = tuple(translation) if translation is not None else (0.0,) * 3
    levels = []
    for k in range(n_levels):
        f = [fk**k for fk in FACTORS]
        lv_shape = tuple(max(1, n // fi) for n, fi in zip(shape, f))
        lv_scale = tuple(s * fi for s, fi in zip(scale, f))
        # a mean over f voxels sits at the centre of the f voxels; a top-left sample does not move
        shift = [(fi - 1) / 2 * s if method == "mean" else 0.0 for fi, s in zip(f, scale)]
        lv_t = tuple(t + d for t, d in zip(base_t, shift))
        levels.append(Level(path=paths[k], shape=lv_shape,
                            chunks=tuple(min(c, n) for c, n in zip(chunks, lv_shape)),
                            dtype=np.dtype(dtype).name, scale=lv_scale,
                            translation=lv_t if any(lv_t) else None))
    return levels


def create_multiscale(group: zarr.Group, levels: Sequence[Level], axes: Sequence[Axis], *,
                      version: str, name: str | None, method: str) -> list[zarr.Array[Any]]:
    """Create (empty) level arrays and write the ``multiscales`` metadata of an image group."""
    arrays = []
    for lv in levels:
        arrays.append(_create_array(group, lv, axes, version, method))
    set_ome(group, version, "multiscales",
            [multiscales_entry(version, tuple(axes), list(levels), name, method)])
    return arrays


def blosc_settings(dtype: np.dtype, method: str) -> tuple[str, int, str]:
    """Blosc (cname, level, shuffle) for an array: labels (``method`` "nearest") zstd level 5
    with bit shuffle; intensities (images, the uncertainty: "mean") zstd level 1, bit shuffle
    for types wider than a byte. ``python -m benchmarks.compression`` on the demo's outputs, one
    core: uint8 labels 44x smaller at 360 MB/s (zstd 5 + byte shuffle: 38x at 200 MB/s); the
    uint8 uncertainty 1.8x at 286 MB/s (zstd 5: 1.9x at 48 MB/s); uint32 ids 306x either way."""
    if method == "nearest":
        return "zstd", 5, "bitshuffle"
    return "zstd", 1, "bitshuffle" if dtype.itemsize > 1 else "shuffle"


def _create_array(group: zarr.Group, lv: Level, axes: Sequence[Axis], version: str,
                  method: str) -> zarr.Array[Any]:
    dtype = np.dtype(lv.dtype)
    cname, level, shuffle = blosc_settings(dtype, method)
    if version == "0.5":
        compressor = BloscCodec(cname=cast(Any, cname), clevel=level, shuffle=cast(Any, shuffle))
        return group.create_array(lv.path, shape=lv.shape, chunks=lv.chunks, dtype=dtype,
                                  compressors=compressor, fill_value=0,
                                  dimension_names=[a.name for a in axes])
    compressor = numcodecs.Blosc(cname=cname, clevel=level,
                                 shuffle=numcodecs.Blosc.BITSHUFFLE if shuffle == "bitshuffle"
                                 else numcodecs.Blosc.SHUFFLE)
    return group.create_array(lv.path, shape=lv.shape, chunks=lv.chunks, dtype=dtype,
                              compressors=compressor, fill_value=0,
                              chunk_key_encoding={"name": "v2", "separator": "/"})


def store_pyramid(data: da.Array | None, arrays: Sequence[zarr.Array[Any]], method: str) -> Delayed:
    """Lazy work that writes ``data`` to ``arrays[0]`` and each level from the one before.

    ``data`` has the shape of ``arrays[0]`` (any leading non-spatial axes of size 1 included),
    or is None when level 0 is already stored (the engine writes it block by block);
    ``method`` is ``"mean"`` (images) or ``"nearest"`` (labels).
    """
    if method not in ("mean", "nearest"):
        raise ValueError(f"unknown downsampling method {method!r}")
    stores: list[Delayed] = []
    src: da.Array | None = data
    for k, target in enumerate(arrays):
        if k == 0 and data is None:
            continue
        if k > 0:
            prev = arrays[k - 1]
            lead = (1,) * (prev.ndim - 3)
            factors = level_factors(prev.shape[-3:], target.shape[-3:])
            grouped = chunk_multiples(target.chunks[-3:], factors, target.shape[-3:])
            read_chunks = lead + tuple(c * f * m for c, f, m in
                                       zip(target.chunks[-3:], factors, grouped))
            src = da.from_zarr(prev, chunks=read_chunks)
            if stores:
                src = bind(src, stores[-1])
            src = _downsample(src, target.shape, method, factors)
        if src is None:
            raise VolrefError(f"internal: no source for level {k}")
        if tuple(src.shape) != tuple(target.shape):
            raise VolrefError(f"internal: level {k} shape {src.shape} != target {target.shape}")
        write_chunks = tuple(target.chunks) if k == 0 else lead + tuple(
            c * m for c, m in zip(target.chunks[-3:], grouped))
        src = src.astype(target.dtype).rechunk(write_chunks)  # whole zarr chunks per task
        stores.append(da.store(src, cast(Any, target), lock=False, compute=False))
    done: Delayed = dask.delayed(_done)(stores)
    return done


def _done(_: Any) -> None:
    return None


#: a pyramid task reads at most this many voxels of the level before (unless one chunk does)
PYRAMID_TASK_VOXELS = 2**23


def chunk_multiples(chunks: Sequence[int], factors: Sequence[int],
                    shape: Sequence[int]) -> tuple[int, ...]:
    """Zarr chunks of a level per pyramid task along (z, y, x): doubled along x, y, z in turn
    while the task reads at most :data:`PYRAMID_TASK_VOXELS` and does not pass the level's
    edge. Small chunks then cost a task per group of chunks, not several per chunk; each task
    still writes whole chunks, and a level's bytes do not depend on it."""
    m = [1, 1, 1]
    grown = True
    while grown:
        grown = False
        for axis in (2, 1, 0):
            read = math.prod(c * f * g for c, f, g in zip(chunks, factors, m))
            if m[axis] * chunks[axis] < shape[axis] and 2 * read <= PYRAMID_TASK_VOXELS:
                m[axis] *= 2
                grown = True
    return m[0], m[1], m[2]


def level_factors(prev: Sequence[int], target: Sequence[int]) -> tuple[int, ...]:
    """The integer factor per axis from one level's shape to the next's: the smallest ``f`` with
    ``prev // f == target`` (how :func:`pyramid_geometry` and other writers round), else the
    floor of the ratio (the level is then cropped). A pyramid that also halves z gets 2 in z:
    labels follow the image's real factors in every axis, not an assumed (1, 2, 2)."""
    out = []
    for p, t in zip(prev, target):
        if t < 1 or t > p:
            raise VolrefError(f"a level of shape {tuple(target)} cannot follow {tuple(prev)}")
        f = p // (t + 1) + 1  # the smallest f with p // f <= t
        out.append(f if p // f == t else max(1, p // t))
    return tuple(out)


def _downsample(x: da.Array, target_shape: Sequence[int], method: str,
                factors: Sequence[int] = FACTORS) -> da.Array:
    f = (1,) * (x.ndim - 3) + tuple(factors)

    def block(b: np.ndarray) -> np.ndarray:
        if method == "nearest":
            return b[tuple(slice(None, None, fi) for fi in f)]
        trimmed = b[tuple(slice(0, (n // fi) * fi) for n, fi in zip(b.shape, f))]
        shape = []
        for n, fi in zip(trimmed.shape, f):
            shape += [n // fi, fi]
        mean = trimmed.reshape(shape).mean(axis=tuple(range(1, 2 * len(f), 2)), dtype=np.float64)
        out: np.ndarray = np.rint(mean) if np.issubdtype(b.dtype, np.integer) else mean
        return out

    if method == "nearest":
        out_chunks = tuple(tuple(-(-c // fi) for c in cs) for cs, fi in zip(x.chunks, f))
    else:
        out_chunks = tuple(tuple(c // fi for c in cs) for cs, fi in zip(x.chunks, f))
    dtype = x.dtype if method == "nearest" else np.float64
    y = da.map_blocks(block, x, chunks=out_chunks, dtype=dtype)
    cut: da.Array = y[tuple(slice(0, n) for n in target_shape)]
    return cut


# ---------------------------------------------------------------- label images


def label_levels(image: Multiscale, dtype: npt.DTypeLike,
                 chunks: Sequence[int] | None = None) -> list[Level]:
    """Levels of a label image for ``image``: same paths, spatial shapes and transforms.

    Non-spatial axes (``t``, ``c``) get size 1; ``chunks`` (z, y, x) defaults to the image's.
    """
    lead = image.ndim - 3
    levels = []
    for lv in image.levels:
        shape = (1,) * lead + tuple(lv.shape[-3:])
        spatial = tuple(chunks) if chunks is not None else tuple(lv.chunks[-3:])
        levels.append(Level(path=lv.path, shape=shape,
                            chunks=(1,) * lead + tuple(min(c, n) for c, n in zip(spatial, shape[-3:])),
                            dtype=np.dtype(dtype).name, scale=lv.scale, translation=lv.translation))
    return levels


def create_label_image(root: zarr.Group, name: str, levels: Sequence[Level],
                       axes: Sequence[Axis], *, version: str, info: LabelInfo | None = None,
                       overwrite: bool = False) -> tuple[zarr.Group, list[zarr.Array[Any]]]:
    """Add ``labels/<name>`` (empty arrays + metadata) to an image group or an output store.

    Only groups are added, and marked as volref's (:func:`mark_owned`); a label image of the same
    name is replaced only when volref made it and ``overwrite`` is given, never one another tool
    wrote. The labels group's list gains ``name``, merged into what is there (a ``labels``
    attribute that is not a list of names is refused, not replaced). Every check runs before
    the first write, so a refusal leaves the archive as it was.
    """
    check_name(name)
    labels = _labels_group(root, create=False)
    if labels is not None:
        listed = _listed(labels)
        if has_member(labels, name):
            old = labels[name]
            if not owned(old):
                raise ForeignGroupError(
                    f"labels/{name} was not written by volref; volref never replaces or deletes "
                    "it, --overwrite included (rename it, or use --output for a separate store)")
            if not overwrite:
                raise OutputExistsError(
                    f"label image {name!r} exists; pass --overwrite to replace it")
    if labels is None:
        labels = root.create_group("labels")
        mark_owned(labels)
        listed = []
    elif has_member(labels, name):
        del labels[name]
    group = labels.create_group(name)
    mark_owned(group)
    arrays = create_multiscale(group, levels, axes, version=version, name=name, method="nearest")
    set_ome(group, version, "image-label", (info or LabelInfo()).to_dict())
    if name not in listed:
        set_ome(labels, version, "labels", _listed(labels) + [name])
    return group, arrays


class ForeignGroupError(OutputExistsError):
    """A group volref would write is there and was made by someone else: it is never touched."""


#: the key of volref's own attributes on every group it creates
OWNER_KEY = "volref"


def mark_owned(group: zarr.Group) -> None:
    """Record in ``group``'s attributes that volref created it (and so may replace it)."""
    attrs = group.attrs.get(OWNER_KEY)
    mine = dict(attrs) if isinstance(attrs, dict) else {}
    mine["created_by"] = "volref"
    group.attrs[OWNER_KEY] = mine


def owned(group: zarr.Group | zarr.Array) -> bool:
    """Whether volref created ``group``: its own mark, or (label images written before the mark
    existed) the multiscales metadata volref writes."""
    attrs = dict(group.attrs)
    mine = attrs.get(OWNER_KEY)
    if isinstance(mine, dict) and mine.get("created_by") == "volref":
        return True
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    entries = ome.get("multiscales") if isinstance(ome, dict) else None
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        meta = entries[0].get("metadata")
        return isinstance(meta, dict) and meta.get("method") == "volref nearest downsampling"
    return False


def _listed(labels: zarr.Group) -> list[str]:
    """The ``labels`` list of a labels group; refuses one that is not a list of names."""
    _, ome = ome_attributes(labels)
    if "labels" not in ome:
        return []
    names = ome["labels"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ForeignGroupError(
            f"the 'labels' attribute of labels/ is {type(names).__name__} {names!r:.60}, not a "
            "list of names; volref does not replace it (fix it, or use --output)")
    return list(names)


def _labels_group(root: zarr.Group, create: bool) -> zarr.Group | None:
    try:
        node = root["labels"]
    except KeyError:
        return root.create_group("labels") if create else None
    if not isinstance(node, zarr.Group):
        raise ForeignGroupError("'labels' exists in the store and is not a group")
    return node
