"""``instances``: one id per mitochondrion across the volume, ``labels/volref-mitochondria``.

Steps (see :mod:`volref.stages.instances`): label blocks and keep their faces (tasks), pair ids
across every face between neighbours (tasks), union-find and compaction (here: only ids that
touch a face and one key per block-local id), relabel blocks with their own small table (tasks,
recorded in the manifest). Steps 1-3 are cheap and repeated on a resumed run; they give the same
tables, so finished relabel blocks stay valid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from volref.classes import BACKGROUND, counted, mitochondria
from volref.engine.grid import Block
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
from volref.stages.instances import BlockLabels, block_labels, face_pairs, label_block, resolve

log = logging.getLogger(__name__)

#: fewer voxels than this is a speck, not a mitochondrion (:class:`RunSettings`)
MIN_VOXELS: int = default_of(RunSettings, "min_voxels")


@dataclass(frozen=True)
class InstanceJob:
    refined: Source
    out: Source
    volume: tuple[int, int, int]
    manifest: Manifest


def _mask(job: InstanceJob, block: Block) -> np.ndarray:
    return job.refined.read(block.start, block.stop, "constant") != BACKGROUND


def label_task(job: InstanceJob, block: Block) -> BlockLabels:
    return block_labels(_mask(job, block), block.start, job.volume)


def pair_task(low: BlockLabels, high: BlockLabels, axis: int) -> np.ndarray:
    return face_pairs(low.faces[(axis, 1)], high.faces[(axis, 0)])


def summary_task(b: BlockLabels) -> tuple[int, np.ndarray, np.ndarray]:
    return b.n, b.keys, b.sizes


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
    # steps 1-2 on the workers
    notify = observer or (lambda e: None)
    notify({"event": "start", "stage": "instances: faces", "total": len(blocks), "done": 0})
    number = {b.index: i for i, b in enumerate(blocks)}
    labelled: dict[tuple[int, int, int], Any] = {}  # blocks whose faces are still needed
    pairs: list[tuple[int, int, Any]] = []
    summary_futures = []
    for b in blocks:  # raster order: a block's lower neighbours are labelled before it
        labelled[b.index] = executor.submit(label_task, job, b, key=f"label-{b.key}")
        for axis in range(3):
            low = list(b.index)
            low[axis] -= 1
            if low[axis] >= 0:
                a = grid[low]
                pairs.append((number[a.index], number[b.index],
                              executor.submit(pair_task, labelled[a.index], labelled[b.index],
                                              axis, key=f"pair-{a.key}-{axis}")))
        summary_futures.append(executor.submit(summary_task, labelled[b.index],
                                               key=f"summary-{b.key}"))
        # the block below in z has met all its upper neighbours: its faces can go (so only
        # one slab of blocks' faces is held at a time, here when blocks run in this process)
        labelled.pop((b.index[0] - 1, b.index[1], b.index[2]), None)
    del labelled
    summaries = executor.gather(summary_futures)
    pair_values = executor.gather([p[2] for p in pairs])
    notify({"event": "end", "stage": "instances: faces", "blocks": len(blocks),
            "computed": len(blocks), "seconds": time.perf_counter() - start})
    # step 3 here
    edges = [(a, b, v) for (a, b, _), v in zip(pairs, pair_values)]
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
