"""``segment``: ensemble labels and uncertainty for a whole OME-Zarr image, block by block.

Writes (into the image's archive, or ``output``; names from :mod:`volref.layout`)::

    labels/volref-initial      ensemble argmax, uint8, as many levels as the image
    volref/uncertainty         normalised entropy as an OME-Zarr image, uint8 (255 = 1.0)
    volref/manifests/segment   finished blocks

A block task reads its block with one slice of z context and ``halo`` pixels of x/y context
(mirrored past the volume), its y and x rounded up to whole tiles, predicts every tile of the
segmentation grid inside it and writes its own chunks, then its manifest record. Tiles sit on a
global grid, batches have a fixed shape: the bytes written do not depend on the block shape or
the number of workers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import zarr

from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, worker_address
from volref.errors import OutputExistsError, VolrefError
from volref.io import (
    LabelInfo,
    Volume,
    create_label_image,
    create_multiscale,
    label_levels,
    store_pyramid,
)
from volref.io.store import has_member
from volref.layout import (
    INITIAL,
    STAGE_OUTPUTS,
    UNCERTAINTY,
    UNCERTAINTY_PATH,
    existing_levels,
    label_path,
)
from volref.models.registry import DEFAULT_SEGMENTER, load_segmenter
from volref.pipeline.blocks import MODEL_LOCK, Source, cached_model, device
from volref.pipeline.intensity import volume_intensity
from volref.pipeline.stage import (
    Halo,
    StageContext,
    StagePlan,
    check_block_finite,
    check_finite,
    check_model,
    finish_stage,
    open_outputs,
    tasks_of,
)
from volref.pipeline.store import record_provenance
from volref.stages.normalise import IntensityRange, normalise
from volref.stages.segment import segment_slices, uncertainty_to_uint8
from volref.stages.settings import SegmentSettings

log = logging.getLogger(__name__)


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
    halo: Halo = Halo()


@dataclass(frozen=True)
class SegmentStage:
    """The ensemble over every block (see the module doc)."""

    settings: SegmentSettings = field(default_factory=SegmentSettings)
    model: str | os.PathLike | None = None
    name: str = "segment"

    def align(self) -> int:
        return self.settings.tile

    def halo(self) -> Halo:
        """One slice of z context, ``halo`` pixels in y and x, whole tiles."""
        return Halo.around(1, self.settings.halo, self.settings.tile)

    def plan(self, ctx: StageContext) -> StagePlan:
        """Create or reopen the outputs and list the block tasks (nothing is computed)."""
        settings, vol, root = self.settings, ctx.vol, ctx.root
        model_key = check_model(self.model, DEFAULT_SEGMENTER, load_segmenter)
        ms = vol.multiscale
        image = ctx.image()
        try:
            irange, chosen = volume_intensity(vol, model_key[0], settings, check_finite)
        except VolrefError:  # the user's mistake or a named bad chunk: nothing to find
            raise
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: find and name it
            image.raise_if_corrupt((0, 0, 0), vol.shape, exc)
            raise
        # what the results are made from: the image's listing and the voxels sampled from it
        inputs = {"image": ctx.image_fingerprint, "sample": chosen["sample"]}
        record = {"image": {"shape": vol.shape, "dtype": str(vol.dtype),
                            "selection": vol.selection}, "inputs": inputs,
                  "model_sha256": model_key[1], "settings": settings.to_dict(),
                  "intensity": irange.to_dict(), "intensity_from": chosen["from"]}
        manifest = Manifest(ctx.meta, self.name)

        def create(over: bool) -> list[list[zarr.Array]]:
            if not over and has_member(ctx.meta, UNCERTAINTY):  # refuse before creating anything
                raise OutputExistsError(f"{UNCERTAINTY_PATH} exists; pass --overwrite to replace it")
            _, labels = create_label_image(root, INITIAL, label_levels(ms, "uint8"), ms.axes,
                                           version=ms.version,
                                           info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                           overwrite=over)
            return [labels, _uncertainty_image(ctx, over)]

        def reopen() -> list[list[zarr.Array]] | None:
            labels = existing_levels(root, label_path(INITIAL))
            unc = existing_levels(root, UNCERTAINTY_PATH)
            return [labels, unc] if labels and unc else None

        (labels, unc), resumed = open_outputs(ctx, manifest, record, create, reopen)
        record_provenance(root, self.name, {"image": vol.location, "selection": vol.selection,
                                            "model": model_key[0], **record,
                                            "intensity_background": chosen.get("background")})
        halo = self.halo()
        job = SegmentJob(image=image, labels=ctx.source(labels[0]),
                         uncertainty=ctx.source(unc[0]), settings=settings, intensity=irange,
                         model=model_key, manifest=manifest, halo=halo)
        return StagePlan(job, tasks_of(ctx.grid, segment_block, job, halo, gpu=True), manifest,
                         [store_pyramid(None, labels, "nearest"),
                          store_pyramid(None, unc, "mean")], resumed)

    def run(self, ctx: StageContext, executor: Executor,
            observer: Observer | None = None) -> StageReport:
        """Segment every unfinished block, then build the pyramids of both outputs."""
        return finish_stage(executor, ctx, self.plan(ctx), observer)


def segment_block(job: SegmentJob, block: Block) -> dict[str, Any]:
    """Segment one block, write its chunks, then record it. Returns its timings."""
    start = time.perf_counter()
    lo, hi = job.halo.region(block)
    raw = job.image.read(lo, hi, "mirror")
    check_block_finite(raw, lo, block)
    stack = normalise(raw, job.intensity)
    dev = device()
    ensemble = cached_model(load_segmenter, *job.model, dev)
    with MODEL_LOCK:
        labels, unc = segment_slices(ensemble, stack, job.settings, device=dev)
    (_z0, y0, x0), (_z1, y1, x1) = block.start, block.stop
    core = (slice(None), slice(0, y1 - y0), slice(0, x1 - x0))
    chunks = {path: source.write(block, data) for path, source, data in
              zip(STAGE_OUTPUTS["segment"], (job.labels, job.uncertainty),
                  (labels[core], uncertainty_to_uint8(unc[core])))}
    seconds = time.perf_counter() - start
    job.manifest.record(block.key, {"seconds": round(seconds, 3), "device": dev,
                                    "worker": worker_address(), "chunks": chunks})
    return {"seconds": seconds}


def _uncertainty_image(ctx: StageContext, overwrite: bool) -> list[zarr.Array]:
    meta, ms = ctx.meta, ctx.vol.multiscale
    if has_member(meta, UNCERTAINTY):
        if not overwrite:
            raise OutputExistsError(f"{UNCERTAINTY_PATH} exists; pass --overwrite to replace it")
        del meta[UNCERTAINTY]
    group = meta.create_group(UNCERTAINTY)
    return create_multiscale(group, label_levels(ms, "uint8"), ms.axes, version=ms.version,
                             name="volref uncertainty (normalised entropy x 255)", method="mean")


def plan_segment(vol: Volume, root: zarr.Group, grid: BlockGrid, *,
                 model: str | os.PathLike | None = None, settings: SegmentSettings | None = None,
                 overwrite: bool = False) -> tuple[SegmentJob, list[BlockTask], StagePlan]:
    """:meth:`SegmentStage.plan` as a function (job, tasks, plan), for scripts."""
    plan = SegmentStage(settings or SegmentSettings(), model).plan(
        StageContext(vol, root, grid, overwrite))
    return plan.job, plan.tasks, plan
