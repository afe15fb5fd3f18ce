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
from dataclasses import dataclass, field, replace
from typing import Any

from volref.engine.cluster import ClusterSpec, connect, peak_memory
from volref.engine.grid import BlockGrid, plan_blocks
from volref.engine.lock import store_lock
from volref.engine.runner import Executor, Observer, StageReport
from volref.errors import ConfigError
from volref.io import Volume, open_image, redact
from volref.io.store import is_url, local_path
from volref.io.units import spacing_um
from volref.layout import META
from volref.pipeline.blocks import precision_here
from volref.pipeline.instances import InstancesStage
from volref.pipeline.measure import MeasureStage
from volref.pipeline.publish import publish
from volref.pipeline.refine import RefineStage
from volref.pipeline.segment import SegmentStage
from volref.pipeline.settings import RunSettings  # noqa: F401 - part of the run API
from volref.pipeline.stage import Stage, StageContext, run_planned
from volref.pipeline.store import open_target, refused_leaves_no_trace
from volref.settings import AUTO

log = logging.getLogger(__name__)

STAGES = ("segment", "refine", "instances", "measure")


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
    #: what the models computed in (``auto`` resolved), None when no model stage ran
    precision: str | None = None

    def report(self, stage: str) -> StageReport | None:
        return next((r for r in self.reports if r.stage == stage), None)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def with_precision(settings: RunSettings, executor: Executor) -> RunSettings:
    """``settings`` with ``auto`` precision resolved once for the whole run, by the workers its
    models run on (those with a GPU resource, else all): bf16 where every one of them computes it
    natively, else fp32 — one run never mixes precisions, and the stages' records hold the one
    used. Inline, or with no worker up yet (an adaptive cluster): this machine's answer."""
    if AUTO not in (settings.segment.precision, settings.refine.precision):
        return settings
    client = executor.client
    answers = set() if client is None else set(
        client.run(precision_here, workers=executor.model_workers or None).values())
    answers = answers or {precision_here()}
    chosen = answers.pop() if len(answers) == 1 else "fp32"
    log.info("precision auto: %s", chosen)

    def concrete(stage_settings):
        if stage_settings.precision != AUTO:
            return stage_settings
        return replace(stage_settings, precision=chosen)

    return replace(settings, segment=concrete(settings.segment),
                   refine=concrete(settings.refine))


def lock(root, where: str):
    """The output store's run lock (see :mod:`volref.engine.lock`)."""
    meta = root.require_group(META)
    local = None if is_url(where) else local_path(where) / root.path / META
    return store_lock(meta, local, redact(where))


def stages_of(settings: RunSettings, names: Sequence[str] = STAGES) -> list[Stage]:
    """The stages ``names`` asks for, in pipeline order, set up from ``settings``."""
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    every: dict[str, Stage] = {
        "segment": SegmentStage(settings.segment, settings.segmenter),
        "refine": RefineStage(settings.refine, settings.refiner, settings.method,
                              settings.segmenter, settings.labels, fusion=settings.fusion),
        "instances": InstancesStage(settings.min_voxels),
        "measure": MeasureStage(settings.csv),
    }
    return [every[name] for name in STAGES if name in names]


def block_grid(vol: Volume, settings: RunSettings, stages: Sequence[str] = STAGES,
               min_blocks: int = 1) -> BlockGrid:
    """The grid shared by the stages that run (see the module doc): model stages align blocks
    to their tile grids, the others only to the chunks."""
    align = math.lcm(1, *(stage.align() for stage in stages_of(settings, stages)))
    chunks = vol.multiscale.levels[0].chunks[-3:]
    return plan_blocks(vol.shape, chunks, align, settings.block_shape, min_blocks)


def run(location: str | os.PathLike, *, stages: Sequence[str] = STAGES,
        output: str | os.PathLike | None = None, settings: RunSettings | None = None,
        cluster: ClusterSpec | None = None, channel: int | None = None,
        timepoint: int | None = None, observer: Observer | None = None,
        on_connect=None, client=None) -> RunResult:
    """Run ``stages`` (in pipeline order) on the image at ``location``.

    ``on_connect(connection)`` is called once the cluster is up (the CLI prints the dashboard).
    ``client``: an existing ``distributed.Client`` to run on instead of ``cluster`` (not closed).
    """
    if client is not None and cluster is not None:
        raise ConfigError("give a client or a cluster, not both")
    settings = settings or RunSettings()
    chosen = stages_of(settings, stages)
    cluster = cluster or ClusterSpec(gpus=0 if client is not None else gpu_count())
    vol = open_image(location, channel=channel, timepoint=timepoint)
    block_grid(vol, settings, stages)  # a bad block shape fails before a cluster starts
    if "measure" in stages:  # so does an axis unit that cannot be converted to micrometres
        spacing_um(vol.scale, vol.units, where=vol.location)
    target = open_target(location, vol.multiscale, output)
    root, where = target.root, target.where
    reports: list[StageReport] = []
    peaks: dict[str, dict[str, int]] = {}
    with refused_leaves_no_trace(target, stages), lock(root, where), \
            connect(cluster, client) as conn:
        if on_connect is not None:
            on_connect(conn)
        executor = Executor(conn.client)
        settings = with_precision(settings, executor)
        chosen = stages_of(settings, stages)
        grid = block_grid(vol, settings, stages, min_blocks=2 * executor.workers)
        ctx = StageContext(vol, root, grid, settings.overwrite)
        for stage in chosen:
            log.info("%s: %d blocks of %s on %s", stage.name, len(grid), grid.block,
                     conn.description)
            reports.append(stage.run(ctx, executor, observer))
            peaks[stage.name] = peak_memory(conn.client)
        publish(vol, root, executor, own_image=output is None or str(output) == str(location))
        final = peak_memory(conn.client)
    models = [s for s in ("segment", "refine") if s in stages]
    precision = None if not models else (settings.segment if models[0] == "segment"
                                         else settings.refine).precision
    return RunResult(redact(where), grid, conn.description, conn.dashboard, reports, final, peaks,
                     precision)


def run_block(location: str | os.PathLike, index: Sequence[int], *,
              stages: Sequence[str] = ("segment", "refine"),
              output: str | os.PathLike | None = None, settings: RunSettings | None = None,
              channel: int | None = None, timepoint: int | None = None) -> dict[str, Any]:
    """Run one block of the block stages here, in this process (for debugging): a plain function
    call, so a debugger or a profiler sees everything. Writes and records the block as a run
    would. ``refine`` needs ``segment`` finished on the whole volume (it reads neighbours)."""
    settings = with_precision(settings or RunSettings(), Executor(None))
    vol = open_image(location, channel=channel, timepoint=timepoint)
    grid = block_grid(vol, settings, stages)
    block = grid[index]
    target = open_target(location, vol.multiscale, output)
    out: dict[str, Any] = {"block": block.key}
    with refused_leaves_no_trace(target, stages), lock(target.root, target.where):
        return _run_block(vol, target.root, grid, block, stages, settings, out)


def _run_block(vol, root, grid, block, stages, settings, out) -> dict[str, Any]:
    ctx = StageContext(vol, root, grid, settings.overwrite)
    for stage in stages_of(settings, [s for s in stages if s in ("segment", "refine")]):
        out[stage.name] = run_planned(stage.plan(ctx), block)  # type: ignore[attr-defined]
    return out
