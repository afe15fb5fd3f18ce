"""``segment``: ensemble labels and uncertainty for a whole OME-Zarr image, block by block.

Writes (into the image's archive, or ``output``)::

    labels/volref-initial      ensemble argmax, uint8, as many levels as the image
    volref/uncertainty         normalised entropy as an OME-Zarr image, uint8 (255 = 1.0)
    volref/manifests/segment   finished blocks

A block task reads its block with one slice of z context and ``halo`` pixels of x/y context
(mirrored past the volume), predicts every tile of the segmentation grid inside it and writes its
own chunks, then its manifest record. Tiles sit on a global grid, batches have a fixed shape:
the bytes written do not depend on the block shape or the number of workers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import (
    BlockTask,
    Executor,
    Observer,
    StageReport,
    run_blocks,
    worker_address,
)
from volref.errors import ImageDataError, OutputExistsError, VolrefError
from volref.io import (
    LabelInfo,
    Volume,
    create_label_image,
    create_multiscale,
    label_levels,
    read_multiscale,
    store_pyramid,
)
from volref.io.store import has_member
from volref.models.registry import DEFAULT_SEGMENTER, file_hash, load_segmenter
from volref.pipeline.blocks import MODEL_LOCK, Source, cached_model, device, open_outputs
from volref.pipeline.intensity import volume_intensity
from volref.pipeline.store import record_provenance
from volref.stages.normalise import IntensityRange, normalise
from volref.stages.segment import SegmentSettings, segment_slices, uncertainty_to_uint8

log = logging.getLogger(__name__)

INITIAL = "volref-initial"
UNCERTAINTY = "volref/uncertainty"


@dataclass(frozen=True)
class SegmentJob:
    """Everything a block task needs (small and picklable: arrays are opened stores)."""

    image: Source
    labels: Source
    uncertainty: Source
    settings: SegmentSettings
    intensity: IntensityRange
    model: tuple[str, str]  # path, sha256
    manifest: Manifest


def check_model(model: str | os.PathLike | None, default, loader) -> tuple[str, str]:
    """Path and hash of a checkpoint, loaded once here so a bad file fails before any block."""
    path = str(model or default)
    digest = file_hash(path)
    cached_model(loader, path, digest, "cpu")
    return path, digest


def plan_segment(vol: Volume, root: zarr.Group, grid: BlockGrid, *,
                 model: str | os.PathLike | None = None, settings: SegmentSettings | None = None,
                 overwrite: bool = False) -> tuple[SegmentJob, list[BlockTask], dict[str, Any]]:
    """Create or reopen the outputs and list the block tasks (nothing is computed)."""
    settings = settings or SegmentSettings()
    model_key = check_model(model, DEFAULT_SEGMENTER, load_segmenter)
    ms = vol.multiscale
    image = Source(vol.group[ms.levels[vol.level].path],
                   tuple(vol.selection[a.name] for a in ms.axes[:ms.ndim - 3]))
    try:
        irange, chosen = volume_intensity(vol, model_key[0], settings, check_finite)
    except VolrefError:  # the user's mistake or a named bad chunk: nothing to find
        raise
    except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: find and name it
        image.raise_if_corrupt((0, 0, 0), vol.shape, exc)
        raise
    record = {"image": {"shape": vol.shape, "dtype": str(vol.dtype), "selection": vol.selection},
              "model_sha256": model_key[1], "settings": settings.to_dict(),
              "intensity": irange.to_dict(), "intensity_from": chosen["from"]}
    meta = root.require_group("volref")
    manifest = Manifest(meta, "segment")

    def create(over: bool) -> list[zarr.Array]:
        _, labels = create_label_image(root, INITIAL, label_levels(ms, "uint8"), ms.axes,
                                       version=ms.version,
                                       info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                       overwrite=over)
        return [labels, _uncertainty_image(root, ms, over)]

    def reopen() -> list[list[zarr.Array]] | None:
        found = [existing_levels(root, f"labels/{INITIAL}"), existing_levels(root, UNCERTAINTY)]
        return found if all(found) else None

    (labels, unc), resumed = open_outputs(manifest, record, overwrite, create, reopen)
    record_provenance(root, "segment", {"image": vol.location, "selection": vol.selection,
                                        "model": model_key[0], **record,
                                        "intensity_background": chosen.get("background")})
    nlead = (0,) * (ms.ndim - 3)
    job = SegmentJob(image=image,
                     labels=Source(labels[0], nlead), uncertainty=Source(unc[0], nlead),
                     settings=settings, intensity=irange, model=model_key, manifest=manifest)
    tasks = [BlockTask(b.key, segment_block, (job, b), gpu=True) for b in grid]
    return job, tasks, {"resumed": resumed, "arrays": (labels, unc)}


def segment(vol: Volume, root: zarr.Group, grid: BlockGrid, executor: Executor, *,
            observer: Observer | None = None, **options: Any) -> StageReport:
    """Segment every unfinished block, then build the pyramids of both outputs."""
    job, tasks, info = plan_segment(vol, root, grid, **options)
    labels, unc = info["arrays"]
    return finish_stage(executor, job.manifest, "segment", tasks, observer,
                        [store_pyramid(None, labels, "nearest"),
                         store_pyramid(None, unc, "mean")])


def finish_stage(executor: Executor, manifest: Manifest, stage: str, tasks: list[BlockTask],
                 observer: Observer | None, pyramids: list) -> StageReport:
    """Run the blocks not yet recorded, then the pyramid levels, then mark the stage done."""
    report = run_blocks(executor, stage, tasks, manifest.finished(), observer)
    if report.computed or not manifest.done:
        start = time.perf_counter()
        executor.compute(pyramids)
        report.seconds += time.perf_counter() - start
        manifest.mark_done(report.to_dict())
    return report


def check_finite(data: np.ndarray, where: str) -> None:
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageDataError(f"the image has NaN or Inf intensities ({bad} voxels in {where}); "
                                 "volref needs finite values: fix or mask them first")


def segment_block(job: SegmentJob, block: Block) -> dict[str, Any]:
    """Segment one block, write its chunks, then record it. Returns its timings."""
    start = time.perf_counter()
    s = job.settings
    (z0, y0, x0), (z1, y1, x1) = block.start, block.stop
    t, h = s.tile, s.halo
    yp, xp = -(-(y1 - y0) // t) * t, -(-(x1 - x0) // t) * t  # whole tiles (mirrored past the end)
    raw = job.image.read((z0 - 1, y0 - h, x0 - h), (z1 + 1, y0 + yp + h, x0 + xp + h), "mirror")
    check_finite(raw, f"block {block.key}")
    stack = normalise(raw, job.intensity)
    dev = device()
    ensemble = cached_model(load_segmenter, *job.model, dev)
    with MODEL_LOCK:
        labels, unc = segment_slices(ensemble, stack, s, device=dev)
    core = (slice(None), slice(0, y1 - y0), slice(0, x1 - x0))
    job.labels.write(block, labels[core])
    job.uncertainty.write(block, uncertainty_to_uint8(unc[core]))
    seconds = time.perf_counter() - start
    job.manifest.record(block.key, {"seconds": round(seconds, 3), "device": dev,
                                       "worker": worker_address()})
    return {"seconds": seconds}


def existing_levels(root: zarr.Group, path: str) -> list[zarr.Array] | None:
    """The level arrays of the image at ``path`` below ``root``, or None if it is not there."""
    try:
        return levels_of(root[path])
    except KeyError:
        return None


def levels_of(group: zarr.Group) -> list[zarr.Array]:
    ms = read_multiscale(group, where=group.path)
    return [group[lv.path] for lv in ms.levels]


def _uncertainty_image(root: zarr.Group, ms, overwrite: bool) -> list[zarr.Array]:
    meta = root.require_group("volref")
    if has_member(meta, "uncertainty"):
        if not overwrite:
            raise OutputExistsError("volref/uncertainty exists; pass --overwrite to replace it")
        del meta["uncertainty"]
    group = meta.create_group("uncertainty")
    return create_multiscale(group, label_levels(ms, "uint8"), ms.axes, version=ms.version,
                             name="volref uncertainty (normalised entropy x 255)", method="mean")
