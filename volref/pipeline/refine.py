"""``refine``: MAE refinement of ``labels/volref-initial`` into ``labels/volref-refined``.

``method`` picks the refiner: the MAE (default), or one of the paper's baselines — ``mae-x``
(MAE with an image encoder: reads the image too), ``cnn-ae`` (convolutional denoising
autoencoder: repaints whole tiles) or ``crf`` (dense CRF on the ensemble's probabilities and the
image: re-runs the ensemble that made the initial labels over the block, since only labels and
uncertainty are stored, and relabels each 128-px tile that holds a removed patch).

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
from volref.models.registry import (
    DEFAULT_REFINERS,
    DEFAULT_SEGMENTER,
    load_refiner,
    load_segmenter,
    refiner_method,
)
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
from volref.stages.crf import CRFSettings, crf_region
from volref.stages.normalise import IntensityRange, normalise
from volref.stages.refine import METHODS, RefineSettings, context, refine_region
from volref.stages.segment import SegmentSettings, segment_probabilities, uncertainty_from_uint8

log = logging.getLogger(__name__)

REFINED = "volref-refined"


@dataclass(frozen=True)
class RefineJob:
    initial: Source
    uncertainty: Source
    refined: Source
    settings: RefineSettings
    model: tuple[str, str]  # the refiner (crf: the ensemble), path and sha256
    manifest: Manifest
    method: str = "mae"
    image: Source | None = None  # mae-x and crf read the image
    intensity: IntensityRange | None = None  # as the segment stage normalised it
    segment: SegmentSettings | None = None  # crf: how the ensemble ran
    crf: CRFSettings = CRFSettings()


#: crf: pixels of context around each tile (past the near-mitochondrion test's reach)
CRF_MARGIN = 32


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
                overwrite: bool = False, method: str = "mae",
                segmenter: str | os.PathLike | None = None
                ) -> tuple[RefineJob, list[BlockTask], list[zarr.Array]]:
    if method not in METHODS:
        raise ConfigError(f"unknown refinement method {method!r} (choose from "
                          f"{', '.join(METHODS)})")
    meta = root.require_group("volref")
    upstream = require_done(meta, "segment", f"labels/{INITIAL} and volref/uncertainty are",
                            "segment")
    made_with = upstream.settings()
    settings = settings or RefineSettings()
    if method == "crf":
        model_key = check_model(segmenter, DEFAULT_SEGMENTER, load_segmenter)
        if made_with.get("model_sha256") not in (None, model_key[1]):
            raise ConfigError("--method crf refines the probabilities of the ensemble that made "
                              f"labels/{INITIAL}; {model_key[0]} is another one (pass that "
                              "ensemble with --segmenter)")
        if any(b % settings.tile for b in grid.block[1:]):
            raise ConfigError(f"--method crf relabels {settings.tile}-px tiles: the block's y and "
                              f"x ({grid.block[1]}, {grid.block[2]}) must be multiples of it")
    else:
        model_key = check_model(model, DEFAULT_REFINERS[method], load_refiner)
        found = refiner_method(cached_model(load_refiner, *model_key, "cpu"))
        if found != method:
            raise ConfigError(f"{model_key[0]} is a {found} model, not {method}")
        settings = model_settings(model_key, settings)
    initial = levels_of(root["labels"][INITIAL])
    unc = levels_of(root["volref"]["uncertainty"])
    ms = vol.multiscale
    record: dict[str, Any] = {"segment": upstream.settings_digest(), "model_sha256": model_key[1],
              "settings": settings.to_dict(), "method": method}
    if method == "crf":
        record["crf"] = CRFSettings().to_dict()
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
    needs_image = method in ("mae-x", "crf")
    image = Source(vol.group[ms.levels[vol.level].path],
                   tuple(vol.selection[a.name] for a in ms.axes[:ms.ndim - 3])) \
        if needs_image else None
    if needs_image and "intensity" not in made_with:
        raise ConfigError(f"--method {method} reads the image normalised as segment did, but the "
                          "segment record holds no intensity range: run volref segment again")
    job = RefineJob(Source(initial[0], lead), Source(unc[0], lead), Source(arrays[0], lead),
                    settings, model_key, manifest, method=method, image=image,
                    intensity=IntensityRange(**made_with["intensity"]) if needs_image else None,
                    segment=SegmentSettings(**made_with.get("settings", {}))
                    if method == "crf" else None)
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
    if job.method == "crf":
        stats = _crf_block(job, block)
    else:
        s = job.settings
        dev = device()
        mae = cached_model(load_refiner, *job.model, dev)
        c = context(s, mae.config.patch)
        (z0, y0, x0), (z1, y1, x1) = block.start, block.stop
        lo, hi = (z0, y0 - c, x0 - c), (z1, y1 + c, x1 + c)
        labels = job.initial.read(lo, hi, "zero")
        unc = uncertainty_from_uint8(job.uncertainty.read(lo, hi, "zero"))
        image = normalise(job.image.read(lo, hi, "mirror"), job.intensity) \
            if job.image is not None and job.intensity is not None else None
        with MODEL_LOCK:
            out = refine_region(mae, labels, unc, s, device=dev, image=image)
        job.refined.write(block, out.labels)
        stats = {"tiles": out.tiles_total, "tiles_run": out.tiles_run,
                 "removed_px": int(out.removed.sum()), "device": dev}
    stats.update(seconds=round(time.perf_counter() - start, 3), worker=worker_address())
    job.manifest.record(block.key, stats)
    return stats


def _crf_block(job: RefineJob, block: Block) -> dict[str, Any]:
    """``--method crf`` on one block: the ensemble's probabilities over the block plus the CRF's
    margin, computed on the segment stage's global tile grid (so they equal what segment saw),
    then :func:`~volref.stages.crf.crf_region`."""
    s, seg, m = job.settings, job.segment, CRF_MARGIN
    if seg is None or job.image is None or job.intensity is None:
        raise ConfigError("internal: the crf method needs the segment settings and the image")
    dev = device()
    ens = cached_model(load_segmenter, *job.model, dev)
    (z0, y0, x0), (z1, y1, x1) = block.start, block.stop
    lo, hi = (z0, y0 - m, x0 - m), (z1, y1 + m, x1 + m)
    labels = job.initial.read(lo, hi, "zero")
    unc = uncertainty_from_uint8(job.uncertainty.read(lo, hi, "zero"))
    t, h = seg.tile, seg.halo
    ys, xs = (y0 - m) // t * t, (x0 - m) // t * t  # on the ensemble's tile grid
    ye, xe = -(-(y1 + m) // t) * t, -(-(x1 + m) // t) * t
    raw = job.image.read((z0 - 1, ys - h, xs - h), (z1 + 1, ye + h, xe + h), "mirror")
    stack = normalise(raw, job.intensity)
    with MODEL_LOCK:
        probs = segment_probabilities(ens, stack, seg, device=dev)
    win = (slice(y0 - m - ys, y1 + m - ys), slice(x0 - m - xs, x1 + m - xs))
    image = stack[1:-1, h:-h, h:-h][(slice(None),) + win]
    out = crf_region(probs[(slice(None), slice(None)) + win], image, labels, unc, tile=s.tile,
                     margin=m, tau=s.tau, near_px=s.near_px, settings=job.crf)
    job.refined.write(block, out)
    return {"tiles": out.shape[0] * -(-out.shape[1] // s.tile) * -(-out.shape[2] // s.tile),
            "device": dev}
