"""``refine``: MAE refinement of ``labels/volref-initial`` into ``labels/volref-refined``.

Reads the initial labels and the uncertainty where ``segment`` wrote them (the image's archive or
``output``) and writes the refined labels beside them. Blocks are whole z-chunks over the whole
x/y plane; slices are independent, so any z-blocking gives the same bytes.
"""

from __future__ import annotations

import dataclasses
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
from volref.errors import ConfigError, VolrefError
from volref.io import (
    LabelInfo,
    create_label_image,
    label_levels,
    open_image,
    read_multiscale,
    store_pyramid,
)
from volref.models.registry import DEFAULT_REFINER, file_hash, load_refiner
from volref.pipeline.segment import INITIAL
from volref.pipeline.store import open_target, record_provenance
from volref.stages.refine import RefineSettings, refine_slice
from volref.stages.segment import uncertainty_from_uint8

log = logging.getLogger(__name__)

REFINED = "volref-refined"
_MODEL_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def cached_refiner(path: str, digest: str, device: str):
    return load_refiner(path, device=device)


def refine(location: str | os.PathLike, *, output: str | os.PathLike | None = None,
           model: str | os.PathLike | None = None, settings: RefineSettings | None = None,
           channel: int | None = None, timepoint: int | None = None,
           overwrite: bool = False, device: str = "cpu") -> Delayed:
    """Prepare ``labels/volref-refined`` and return the lazy work that fills it."""
    settings = settings or RefineSettings()
    vol = open_image(location, channel=channel, timepoint=timepoint)
    model_path = str(model or DEFAULT_REFINER)
    digest = file_hash(model_path)
    tile = cached_refiner(model_path, digest, device).config.tile
    if settings.tile != tile:  # the model decides the tile size
        stride = settings.stride if settings.stride < tile else tile // 2
        try:
            settings = dataclasses.replace(settings, tile=tile, stride=stride)
        except ValueError as exc:
            raise ConfigError(f"stride {settings.stride} does not fit {tile}-pixel tiles: {exc}") from None
    root, where = open_target(location, vol.multiscale, output)
    initial, uncertainty = _inputs(root, where)
    ms = vol.multiscale
    _, arrays = create_label_image(root, REFINED, label_levels(ms, "uint8"), ms.axes,
                                   version=ms.version,
                                   info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                   overwrite=overwrite)
    record_provenance(root, "refine", {"model": model_path, "model_sha256": digest,
                                       "settings": settings.to_dict(), "method": "mae"})
    nz, ny, nx = vol.shape
    cz = arrays[0].chunks[-3]
    zchunks = tuple(min(cz, nz - z) for z in range(0, nz, cz))
    refined = da.map_blocks(
        _refine_block, dtype=np.uint8, chunks=(zchunks, (ny,), (nx,)),
        meta=np.empty((0, 0, 0), np.uint8), initial=initial, uncertainty=uncertainty,
        settings=settings, model=(model_path, digest, device))
    lead = (None,) * (ms.ndim - 3)
    log.info("refine %s -> %s: %d blocks", vol.location, where, len(zchunks))
    return dask.delayed(lambda *_: None)(store_pyramid(refined[lead], arrays, "nearest"))


def _inputs(root: zarr.Group, where: str):
    try:
        lab_group = root["labels"][INITIAL]
        unc_group = root["volref"]["uncertainty"]
    except KeyError:
        raise VolrefError(f"{where} has no labels/{INITIAL} and volref/uncertainty: "
                          "run volref segment first (with the same --output)") from None
    lab_ms = read_multiscale(lab_group, where=f"labels/{INITIAL}")
    unc_ms = read_multiscale(unc_group, where="volref/uncertainty")
    lead = (0,) * (lab_ms.ndim - 3)
    return (lab_group[lab_ms.levels[0].path], lead), (unc_group[unc_ms.levels[0].path], lead)


def _read(source, z0: int, z1: int, margin: int) -> np.ndarray:
    array, lead = source
    data = np.asarray(array[lead + (slice(z0, z1),)])
    return np.pad(data, ((0, 0), (margin, margin), (margin, margin)))


def _refine_block(initial, uncertainty, settings: RefineSettings, model,
                  block_info=None) -> np.ndarray:
    (z0, z1), _, _ = block_info[None]["array-location"]
    m = settings.margin
    labels = _read(initial, z0, z1, m)
    unc = uncertainty_from_uint8(_read(uncertainty, z0, z1, m))
    mae = cached_refiner(*model)
    out = np.empty((z1 - z0, labels.shape[1] - 2 * m, labels.shape[2] - 2 * m), dtype=np.uint8)
    autocast = model[2].startswith("cuda")
    with _MODEL_LOCK:
        for k in range(z1 - z0):
            out[k] = refine_slice(mae, labels[k], unc[k], settings, device=model[2],
                                  autocast=autocast).labels
    return out
