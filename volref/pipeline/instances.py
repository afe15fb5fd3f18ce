"""``instances``: one id per mitochondrion across the volume, ``labels/volref-mitochondria``.

Steps (see :mod:`volref.stages.instances`): label blocks and pair ids across every face between
neighbours (tasks), union-find and compaction (here: one key and size per block-local id),
relabel blocks with their own small table (tasks, recorded in the manifest). Steps 1-3 are cheap
and repeated on a resumed run; they give the same tables, so finished relabel blocks stay valid.

Steps 1-2 run per *group* of blocks (an aligned box of blocks, :func:`group_shape`): one task
labels the group's blocks and pairs the faces inside it, a task per neighbouring group pairs the
faces between them, and only the small summaries and pairs come back. Small blocks then cost a
task per group, not five per block; the ids depend on neither (keys are positions, and the
components of the pair graph do not depend on how its edges were found).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from volref.classes import BACKGROUND, counted, mitochondria
from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, run_blocks
from volref.errors import VolrefError
from volref.io import LabelInfo, create_label_image, label_levels, store_pyramid
from volref.layout import (
    MITOCHONDRIA,
    REFINED,
    STAGE_OUTPUTS,
    existing_levels,
    label_path,
    levels_of,
)
from volref.pipeline.blocks import Source
from volref.pipeline.settings import RunSettings
from volref.pipeline.stage import StageContext, mark_finished, open_outputs, require_done
from volref.pipeline.store import record_provenance
from volref.settings import default_of
from volref.stages.instances import block_labels, face_pairs, label_block, resolve

log = logging.getLogger(__name__)

#: fewer voxels than this is a speck, not a mitochondrion (:class:`RunSettings`)
MIN_VOXELS: int = default_of(RunSettings, "min_voxels")
#: a group of blocks labelled in one task holds at most this many voxels (unless one block does)
GROUP_VOXELS = 2**25
#: at least this many groups per worker, when there are enough blocks (so the step spreads)
GROUPS_PER_WORKER = 4

Summary = tuple[int, np.ndarray, np.ndarray]  # (n, keys, sizes) of a block's local ids
Edge = tuple[int, int, np.ndarray]  # (block a, block b, pairs of their ids that touch)


@dataclass(frozen=True)
class InstanceJob:
    refined: Source
    out: Source
    volume: tuple[int, int, int]
    manifest: Manifest


def _mask(job: InstanceJob, block: Block) -> np.ndarray:
    return job.refined.read(block.start, block.stop, "constant") != BACKGROUND


@dataclass
class GroupLabels:
    """What step 1 keeps of a group on its worker: every block's summary and the pairs inside
    the group (both go to the client), and the faces on the group's sides (for the pairs with
    the neighbouring groups)."""

    summaries: dict[int, Summary]  # block number -> summary
    edges: list[Edge]
    faces: dict[tuple[tuple[int, int, int], int, int], np.ndarray]  # (block, axis, side) -> ids


def group_shape(counts: tuple[int, int, int], block_voxels: int,
                workers: int) -> tuple[int, int, int]:
    """Blocks per group along (z, y, x): about a cube, doubled along x, y, z in turn while the
    group holds at most :data:`GROUP_VOXELS` and the grid keeps :data:`GROUPS_PER_WORKER`
    groups a worker."""
    target = max(1, min(GROUP_VOXELS // max(block_voxels, 1),
                        math.prod(counts) // (GROUPS_PER_WORKER * max(workers, 1))))
    dims = [1, 1, 1]
    grown = True
    while grown:
        grown = False
        for axis in (2, 1, 0):
            if dims[axis] < counts[axis] and math.prod(dims) * 2 <= target:
                dims[axis] = min(2 * dims[axis], counts[axis])
                grown = True
    return dims[0], dims[1], dims[2]


def _members(group: Block) -> list[tuple[int, int, int]]:
    """Block indices of a group (a block of the grid of groups), in raster order."""
    return [(i, j, k) for i in range(group.start[0], group.stop[0])
            for j in range(group.start[1], group.stop[1])
            for k in range(group.start[2], group.stop[2])]


def group_task(job: InstanceJob, grid: BlockGrid, group: Block) -> GroupLabels:
    """Step 1 for a group: label its blocks, pair the faces between them, keep its side faces."""
    out = GroupLabels({}, [], {})
    faces: dict[tuple[int, int, int], dict[tuple[int, int], np.ndarray]] = {}
    for index in _members(group):
        block = grid[index]
        labels = block_labels(_mask(job, block), block.start, job.volume)
        out.summaries[grid.linear(index)] = (labels.n, labels.keys, labels.sizes)
        faces[index] = labels.faces
        for axis in range(3):
            low = list(index)
            low[axis] -= 1
            if low[axis] >= group.start[axis]:
                below = faces[(low[0], low[1], low[2])]
                out.edges.append((grid.linear(low), grid.linear(index),
                                  face_pairs(below[(axis, 1)], labels.faces[(axis, 0)])))
    for index, sides in faces.items():
        for axis in range(3):
            if index[axis] == group.start[axis]:
                out.faces[(index, axis, 0)] = sides[(axis, 0)]
            if index[axis] == group.stop[axis] - 1:
                out.faces[(index, axis, 1)] = sides[(axis, 1)]
    return out


def group_summary(g: GroupLabels) -> tuple[dict[int, Summary], list[Edge]]:
    return g.summaries, g.edges


def group_pairs(low: GroupLabels, high: GroupLabels, grid: BlockGrid, high_group: Block,
                axis: int) -> list[Edge]:
    """Step 2 between neighbouring groups: the pairs across every block face between them."""
    edges = []
    for index in _members(high_group):
        if index[axis] != high_group.start[axis]:
            continue
        below = list(index)
        below[axis] -= 1
        b = (below[0], below[1], below[2])
        edges.append((grid.linear(b), grid.linear(index),
                      face_pairs(low.faces[(b, axis, 1)], high.faces[(index, axis, 0)])))
    return edges


def relabel_task(job: InstanceJob, block: Block, table: np.ndarray) -> dict[str, Any]:
    labels, n = label_block(_mask(job, block))
    if n + 1 != len(table):
        raise VolrefError(f"block {block.key}: {n} components now, {len(table) - 1} when merged "
                          "(the refined labels changed during the run)")
    written = job.out.write(block, table[labels])
    count = int(np.count_nonzero(np.unique(table[labels])))
    job.manifest.record(block.key, {"mitochondria": count,
                                    "chunks": {STAGE_OUTPUTS["instances"][0]: written}})
    return {"mitochondria": count}


@dataclass(frozen=True)
class InstancesStage:
    """Connected mitochondria with ids unique across the volume (see the module doc). Its
    tasks read and write their own block only (faces are passed between tasks)."""

    min_voxels: int = MIN_VOXELS
    name: str = "instances"

    def align(self) -> int:
        return 1

    def run(self, ctx: StageContext, executor: Executor,
            observer: Observer | None = None) -> StageReport:
        return instances(ctx, executor, observer=observer, min_voxels=self.min_voxels)


def instances(ctx: StageContext, executor: Executor, *, observer: Observer | None = None,
              min_voxels: int = MIN_VOXELS) -> StageReport:
    root, grid, vol = ctx.root, ctx.grid, ctx.vol
    meta = ctx.meta
    upstream = require_done(ctx, "refine", f"{label_path(REFINED)} is", "refine")
    ms = vol.multiscale
    refined = levels_of(root[label_path(REFINED)])
    manifest = Manifest(meta, "instances")
    record = {"refine": upstream.settings_digest(), "connectivity": 6, "min_voxels": min_voxels}

    def create(over: bool) -> list[zarr.Array]:
        return create_label_image(root, MITOCHONDRIA, label_levels(ms, "uint32"), ms.axes,
                                  version=ms.version, info=LabelInfo(), overwrite=over)[1]

    arrays, _ = open_outputs(ctx, manifest, record, create,
                             lambda: existing_levels(root, label_path(MITOCHONDRIA)))
    record_provenance(root, "instances", record)
    job = InstanceJob(ctx.source(refined[0]), ctx.source(arrays[0]), vol.shape, manifest)
    finished = manifest.finished()
    blocks = list(grid)
    start = time.perf_counter()
    if manifest.done and len(finished) == len(blocks):
        return StageReport("instances", total=len(blocks), skipped=len(blocks))
    # steps 1-2 on the workers, a task per group of blocks and per pair of neighbouring groups
    notify = observer or (lambda e: None)
    notify({"event": "start", "stage": "instances: faces", "total": len(blocks), "done": 0})
    groups = BlockGrid(grid.counts, group_shape(grid.counts, math.prod(grid.block),
                                                executor.workers))
    labelled: dict[tuple[int, int, int], Any] = {}  # groups whose faces are still needed
    pair_futures, summary_futures = [], []
    for g in groups:  # raster order: a group's lower neighbours are labelled before it
        labelled[g.index] = executor.submit(group_task, job, grid, g, key=f"label-{g.key}")
        for axis in range(3):
            low = list(g.index)
            low[axis] -= 1
            if low[axis] >= 0:
                pair_futures.append(executor.submit(
                    group_pairs, labelled[(low[0], low[1], low[2])], labelled[g.index], grid, g,
                    axis, key=f"pair-{g.key}-{axis}"))
        summary_futures.append(executor.submit(group_summary, labelled[g.index],
                                               key=f"summary-{g.key}"))
        # the group below in z has met all its upper neighbours: its faces can go (so only
        # one slab of groups' faces is held at a time, here when groups run in this process)
        labelled.pop((g.index[0] - 1, g.index[1], g.index[2]), None)
    del labelled
    summaries: list[Summary] = [(0, np.zeros(0, np.uint64), np.zeros(0, np.int64))] * len(blocks)
    edges: list[Edge] = []
    for found, inside in executor.gather(summary_futures):
        for number, summary in found.items():
            summaries[number] = summary
        edges += inside
    for across in executor.gather(pair_futures):
        edges += across
    notify({"event": "end", "stage": "instances: faces", "blocks": len(blocks),
            "computed": len(blocks), "seconds": time.perf_counter() - start})
    # step 3 here
    tables, n = resolve(summaries, edges, min_voxels)
    log.info("instances: %s from %s", mitochondria(n),
             counted(sum(s[0] for s in summaries), "block-local piece", "block-local pieces"))
    # step 4 on the workers
    tasks = [BlockTask(b.key, relabel_task, (job, b, t)) for b, t in zip(blocks, tables)]
    report = run_blocks(executor, "instances", tasks, finished, observer)
    executor.compute([store_pyramid(None, arrays, "nearest")])
    report.seconds = time.perf_counter() - start
    report.results = {"mitochondria": n}
    mark_finished(root, manifest, {**report.to_dict(), "mitochondria": n})
    return report
