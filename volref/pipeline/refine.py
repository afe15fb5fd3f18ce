"""``refine``: MAE refinement of ``labels/volref-initial`` into ``labels/volref-refined``.

Reads the initial labels and the uncertainty where ``segment`` wrote them (the image's archive or
``output``) and writes the refined labels beside them, block by block. A block task reads its
block with ``context`` pixels around it (the tiles' reach plus the reach of the "near a
mitochondrion" test, on the tile grid), refines the tiles of the global grid that touch it, and
writes its own chunks::

       context ┌─────────────────────────┐
               │   tiles reaching in  ┌──┼──┐
               │   ┌─────────────┐    │  │  │   every tile touching the block is run (in
               │   │ block (kept)│    └──┼──┘   global z, y, x order, fixed batch shapes);
               │   └─────────────┘       │      blended probabilities kept inside the block
               └─────────────────────────┘
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import zarr

from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, worker_address
from volref.errors import ConfigError
from volref.io import LabelInfo, Volume, create_label_image, label_levels, store_pyramid
from volref.models.registry import DEFAULT_REFINER, load_refiner
from volref.pipeline.blocks import (
    MODEL_LOCK,
    Source,
    cached_model,
    device,
    open_outputs,
    require_done,
)
from volref.pipeline.segment import (
    INITIAL,
    check_model,
    existing_levels,
    finish_stage,
    levels_of,
)
from volref.pipeline.store import record_provenance
from volref.stages.refine import RefineSettings, context, refine_region
from volref.stages.segment import uncertainty_from_uint8

log = logging.getLogger(__name__)

REFINED = "volref-refined"


@dataclass(frozen=True)
class RefineJob:
    initial: Source
    uncertainty: Source
    refined: Source
    settings: RefineSettings
    model: tuple[str, str]
    manifest: Manifest


def model_settings(model_key: tuple[str, str], settings: RefineSettings) -> RefineSettings:
    """The model decides the tile size; a stride that does not fit becomes half a tile."""
    tile = cached_model(load_refiner, *model_key, "cpu").config.tile
    if settings.tile == tile:
        return settings
    stride = settings.stride if settings.stride < tile else tile // 2
    try:
        return dataclasses.replace(settings, tile=tile, stride=stride)
    except ValueError as exc:
        raise ConfigError(f"stride {settings.stride} does not fit {tile}-pixel tiles: {exc}") \
            from None


def plan_refine(vol: Volume, root: zarr.Group, grid: BlockGrid, *,
                model: str | os.PathLike | None = None, settings: RefineSettings | None = None,
                overwrite: bool = False) -> tuple[RefineJob, list[BlockTask], list[zarr.Array]]:
    model_key = check_model(model, DEFAULT_REFINER, load_refiner)
    settings = model_settings(model_key, settings or RefineSettings())
    meta = root.require_group("volref")
    upstream = require_done(meta, "segment", f"labels/{INITIAL} and volref/uncertainty are",
                            "segment")
    initial = levels_of(root["labels"][INITIAL])
    unc = levels_of(root["volref"]["uncertainty"])
    ms = vol.multiscale
    record = {"segment": upstream.settings_digest(), "model_sha256": model_key[1],
              "settings": settings.to_dict(), "method": "mae"}
    manifest = Manifest(meta, "refine")

    def create(over: bool) -> list[zarr.Array]:
        return create_label_image(root, REFINED, label_levels(ms, "uint8"), ms.axes,
                                  version=ms.version,
                                  info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                  overwrite=over)[1]

    arrays, _ = open_outputs(manifest, record, overwrite, create,
                             lambda: existing_levels(root, f"labels/{REFINED}"))
    record_provenance(root, "refine", {"model": model_key[0], **record})
    lead = (0,) * (ms.ndim - 3)
    job = RefineJob(Source(initial[0], lead), Source(unc[0], lead), Source(arrays[0], lead),
                    settings, model_key, manifest)
    tasks = [BlockTask(b.key, refine_block, (job, b), gpu=True) for b in grid]
    return job, tasks, arrays


def refine(vol: Volume, root: zarr.Group, grid: BlockGrid, executor: Executor, *,
           observer: Observer | None = None, **options: Any) -> StageReport:
    job, tasks, arrays = plan_refine(vol, root, grid, **options)
    return finish_stage(executor, job.manifest, "refine", tasks, observer,
                        [store_pyramid(None, arrays, "nearest")])


def refine_block(job: RefineJob, block: Block) -> dict[str, Any]:
    """Refine one block, write its chunks, then record it. Returns tile counts and timings."""
    start = time.perf_counter()
    s = job.settings
    dev = device()
    mae = cached_model(load_refiner, *job.model, dev)
    c = context(s, mae.config.patch)
    (z0, y0, x0), (z1, y1, x1) = block.start, block.stop
    lo, hi = (z0, y0 - c, x0 - c), (z1, y1 + c, x1 + c)
    labels = job.initial.read(lo, hi, "zero")
    unc = uncertainty_from_uint8(job.uncertainty.read(lo, hi, "zero"))
    with MODEL_LOCK:
        out = refine_region(mae, labels, unc, s, device=dev)
    job.refined.write(block, out.labels)
    stats = {"seconds": round(time.perf_counter() - start, 3), "tiles": out.tiles_total,
             "tiles_run": out.tiles_run, "removed_px": int(out.removed.sum()),
             "device": dev, "worker": worker_address()}
    job.manifest.record(block.key, stats)
    return stats
