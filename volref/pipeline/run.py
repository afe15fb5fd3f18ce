"""``run``: segment -> refine -> instances -> measure over a whole OME-Zarr image, on a cluster.

One block grid serves every stage: blocks are multiples of the output chunks and, in y and x, of
both stages' tile grids. Each stage reads what the previous one wrote, records finished blocks,
and is skipped when its manifest says it is done with the same inputs and settings.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from volref.engine.cluster import ClusterSpec, connect, peak_memory
from volref.engine.grid import BlockGrid, plan_blocks
from volref.engine.lock import store_lock
from volref.engine.runner import Executor, Observer, StageReport
from volref.errors import ConfigError
from volref.io import Volume, open_image, redact
from volref.io.store import is_url, local_path
from volref.pipeline.instances import MIN_VOXELS, instances
from volref.pipeline.measure import measure
from volref.pipeline.publish import publish
from volref.pipeline.refine import model_settings, plan_refine, refine, refine_block
from volref.pipeline.segment import check_model, plan_segment, segment, segment_block
from volref.pipeline.store import open_target
from volref.stages.refine import RefineSettings
from volref.stages.segment import SegmentSettings

log = logging.getLogger(__name__)

STAGES = ("segment", "refine", "instances", "measure")


@dataclass(frozen=True)
class RunSettings:
    """What a run computes (the cluster is chosen separately)."""

    segmenter: str | None = None
    refiner: str | None = None
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    refine: RefineSettings = field(default_factory=RefineSettings)
    method: str = "mae"  # refinement method: mae, or a baseline (mae-x, cnn-ae, crf)
    block_shape: tuple[int, int, int] | None = None
    overwrite: bool = False
    csv: bool = False
    min_voxels: int = MIN_VOXELS


@dataclass
class RunResult:
    target: str
    grid: BlockGrid
    cluster: str
    dashboard: str | None
    reports: list[StageReport]
    peak_memory: dict[str, int] = field(default_factory=dict)  # bytes per worker
    #: each worker's peak so far, read after each stage (peaks only grow: the stage whose
    #: reading rises is the one that set it)
    stage_peak_memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def report(self, stage: str) -> StageReport | None:
        return next((r for r in self.reports if r.stage == stage), None)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def lock(root, where: str):
    """The output store's run lock (see :mod:`volref.engine.lock`)."""
    meta = root.require_group("volref")
    local = None if is_url(where) else local_path(where) / root.path / "volref"
    return store_lock(meta, local, redact(where))


def block_grid(vol: Volume, settings: RunSettings, stages: Sequence[str] = STAGES,
               min_blocks: int = 1) -> BlockGrid:
    """The grid shared by the stages that run (see the module doc): model stages align blocks
    to their tile grids, the others only to the chunks."""
    from volref.models.registry import DEFAULT_REFINERS, load_refiner

    align = 1
    if "segment" in stages:
        align = math.lcm(align, settings.segment.tile)
    if "refine" in stages:
        ref = settings.refine if settings.method == "crf" else model_settings(
            check_model(settings.refiner, DEFAULT_REFINERS.get(settings.method), load_refiner),
            settings.refine)
        align = math.lcm(align, ref.tile)
    chunks = vol.multiscale.levels[0].chunks[-3:]
    return plan_blocks(vol.shape, chunks, align, settings.block_shape, min_blocks)


def run(location: str | os.PathLike, *, stages: Sequence[str] = STAGES,
        output: str | os.PathLike | None = None, settings: RunSettings | None = None,
        cluster: ClusterSpec | None = None, channel: int | None = None,
        timepoint: int | None = None, observer: Observer | None = None,
        on_connect=None) -> RunResult:
    """Run ``stages`` (in pipeline order) on the image at ``location``.

    ``on_connect(connection)`` is called once the cluster is up (the CLI prints the dashboard).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    settings = settings or RunSettings()
    cluster = cluster or ClusterSpec(gpus=gpu_count())
    vol = open_image(location, channel=channel, timepoint=timepoint)
    block_grid(vol, settings, stages)  # a bad block shape fails before a cluster starts
    root, where = open_target(location, vol.multiscale, output)
    reports: list[StageReport] = []
    peaks: dict[str, dict[str, int]] = {}
    with lock(root, where), connect(cluster) as conn:
        if on_connect is not None:
            on_connect(conn)
        executor = Executor(conn.client)
        grid = block_grid(vol, settings, stages, min_blocks=2 * executor.workers)
        common: dict[str, Any] = {"observer": observer, "overwrite": settings.overwrite}
        for stage in STAGES:
            if stage not in stages:
                continue
            log.info("%s: %d blocks of %s on %s", stage, len(grid), grid.block, conn.description)
            if stage == "segment":
                rep = segment(vol, root, grid, executor, model=settings.segmenter,
                              settings=settings.segment, **common)
            elif stage == "refine":
                rep = refine(vol, root, grid, executor, model=settings.refiner,
                             settings=settings.refine, method=settings.method,
                             segmenter=settings.segmenter, **common)
            elif stage == "instances":
                rep = instances(vol, root, grid, executor, min_voxels=settings.min_voxels,
                                **common)
            else:
                rep = measure(vol, root, grid, executor, csv=settings.csv, **common)
            reports.append(rep)
            peaks[stage] = peak_memory(conn.client)
        publish(vol, root, executor, own_image=output is None or str(output) == str(location))
        final = peak_memory(conn.client)
    return RunResult(redact(where), grid, conn.description, conn.dashboard, reports, final, peaks)


def run_block(location: str | os.PathLike, index: Sequence[int], *,
              stages: Sequence[str] = ("segment", "refine"),
              output: str | os.PathLike | None = None, settings: RunSettings | None = None,
              channel: int | None = None, timepoint: int | None = None) -> dict[str, Any]:
    """Run one block of the block stages here, in this process (for debugging): a plain function
    call, so a debugger or a profiler sees everything. Writes and records the block as a run
    would. ``refine`` needs ``segment`` finished on the whole volume (it reads neighbours)."""
    settings = settings or RunSettings()
    vol = open_image(location, channel=channel, timepoint=timepoint)
    grid = block_grid(vol, settings, stages)
    block = grid[index]
    root, where = open_target(location, vol.multiscale, output)
    out: dict[str, Any] = {"block": block.key}
    with lock(root, where):
        return _run_block(vol, root, grid, block, stages, settings, out)


def _run_block(vol, root, grid, block, stages, settings, out) -> dict[str, Any]:
    if "segment" in stages:
        job, _, _ = plan_segment(vol, root, grid, model=settings.segmenter,
                                 settings=settings.segment, overwrite=settings.overwrite)
        out["segment"] = segment_block(job, block)
    if "refine" in stages:
        job, _, _ = plan_refine(vol, root, grid, model=settings.refiner,
                                settings=settings.refine, overwrite=settings.overwrite,
                                method=settings.method, segmenter=settings.segmenter)
        out["refine"] = refine_block(job, block)
    return out
