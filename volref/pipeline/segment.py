"""``segment``: ensemble labels and uncertainty for a whole OME-Zarr image.

Writes (into the image's archive, or ``output``)::

    labels/volref-initial      ensemble argmax, uint8, as many levels as the image
    volref/uncertainty         normalised entropy as an OME-Zarr image, uint8 (255 = 1.0)
    volref/provenance.json     model hash, settings, intensity range

Blocks span whole z-chunks and the whole x/y plane, so each block task writes whole chunks only.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import lru_cache

import dask
import dask.array as da
import numpy as np
import zarr
from dask.delayed import Delayed

from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
from volref.errors import OutputExistsError
from volref.io import (
    LabelInfo,
    Volume,
    create_label_image,
    create_multiscale,
    intensity_sample,
    label_levels,
    open_image,
    store_pyramid,
)
from volref.io.store import has_member
from volref.models.registry import DEFAULT_SEGMENTER, file_hash, load_segmenter
from volref.pipeline.store import open_target, record_provenance
from volref.stages.normalise import IntensityRange, normalise, range_of
from volref.stages.segment import SegmentSettings, segment_slices, uncertainty_to_uint8

log = logging.getLogger(__name__)

INITIAL = "volref-initial"
UNCERTAINTY = "volref/uncertainty"
_MODEL_LOCK = threading.Lock()  # one forward pass at a time per process: torch uses every core


@lru_cache(maxsize=4)
def cached_segmenter(path: str, digest: str, device: str):
    """Models load once per process, keyed by file hash (never shipped through the graph)."""
    return load_segmenter(path, device=device)


def segment(location: str | os.PathLike, *, output: str | os.PathLike | None = None,
            model: str | os.PathLike | None = None, settings: SegmentSettings | None = None,
            channel: int | None = None, timepoint: int | None = None,
            overwrite: bool = False, device: str = "cpu") -> Delayed:
    """Prepare outputs and return the lazy work that segments every block."""
    settings = settings or SegmentSettings()
    vol = open_image(location, channel=channel, timepoint=timepoint)
    model_path = str(model or DEFAULT_SEGMENTER)
    digest = file_hash(model_path)
    cached_segmenter(model_path, digest, device)  # fail early on a bad checkpoint
    irange = range_of(intensity_sample(vol))
    root, where = open_target(location, vol.multiscale, output)
    ms = vol.multiscale
    _, label_arrays = create_label_image(root, INITIAL, label_levels(ms, "uint8"), ms.axes,
                                         version=ms.version,
                                         info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                         overwrite=overwrite)
    unc_arrays = _uncertainty_image(root, ms, overwrite)
    record_provenance(root, "segment", {
        "image": vol.location, "selection": vol.selection, "model": model_path,
        "model_sha256": digest, "settings": settings.to_dict(), "intensity": irange.to_dict()})

    chunks_z = label_arrays[0].chunks[-3]
    nz, ny, nx = vol.shape
    zchunks = tuple(min(chunks_z, nz - z) for z in range(0, nz, chunks_z))
    source = _level0(vol)
    stack = da.map_blocks(
        _segment_block, dtype=np.uint8, chunks=((2,), zchunks, (ny,), (nx,)),
        meta=np.empty((0, 0, 0, 0), np.uint8), source=source, irange=irange,
        settings=settings, model=(model_path, digest, device))
    lead = (None,) * (ms.ndim - 3)
    labels, unc = stack[0][lead], stack[1][lead]
    log.info("segment %s -> %s: %d blocks", vol.location, where, len(zchunks))
    return dask.delayed(lambda *_: None)(store_pyramid(labels, label_arrays, "nearest"),
                                          store_pyramid(unc, unc_arrays, "mean"))


def _uncertainty_image(root: zarr.Group, ms, overwrite: bool) -> list[zarr.Array]:
    meta = root.require_group("volref")
    if has_member(meta, "uncertainty"):
        if not overwrite:
            raise OutputExistsError("volref/uncertainty exists; pass --overwrite to replace it")
        del meta["uncertainty"]
    group = meta.create_group("uncertainty")
    return create_multiscale(group, label_levels(ms, "uint8"), ms.axes, version=ms.version,
                             name="volref uncertainty (normalised entropy x 255)", method="mean")


def _level0(vol: Volume):
    """The zarr array and leading index of the selected volume (read directly by block tasks)."""
    ms = vol.multiscale
    lead = tuple(vol.selection[a.name] for a in ms.axes[:ms.ndim - 3])
    return vol.group[ms.levels[vol.level].path], lead


def read_stack(source, z0: int, z1: int, zhalo: int, xyhalo: int) -> np.ndarray:
    """Slices ``[z0 - zhalo, z1 + zhalo)`` of the whole x/y plane, mirrored past the volume."""
    array, lead = source
    nz = array.shape[-3]
    lo, hi = max(z0 - zhalo, 0), min(z1 + zhalo, nz)
    data = np.asarray(array[lead + (slice(lo, hi),)])
    pad = ((zhalo - (z0 - lo), zhalo - (hi - z1)), (xyhalo, xyhalo), (xyhalo, xyhalo))
    return np.pad(data, pad, mode="symmetric") if any(p for q in pad for p in q) else data


def _segment_block(source, irange: IntensityRange, settings: SegmentSettings, model,
                   block_info=None) -> np.ndarray:
    (_, _), (z0, z1), _, _ = block_info[None]["array-location"]
    raw = read_stack(source, z0, z1, 1, settings.halo)
    stack = normalise(raw, irange)
    ensemble = cached_segmenter(*model)
    with _MODEL_LOCK:
        labels, unc = segment_slices(ensemble, stack, settings, device=model[2])
    return np.stack([labels, uncertainty_to_uint8(unc)])
