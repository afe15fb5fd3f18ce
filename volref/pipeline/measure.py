"""``measure``: one row per mitochondrion, for the initial and the refined segmentation.

1. per block (tasks, recorded): voxel counts, coordinate sums and bounding boxes of the ids in
   the block — statistics that merge by adding and by min/max;
2. here: merge them into one row per id (voxels, box, centroid);
3. per group of mitochondria (tasks, recorded): the paper's five metrics on each z-slice of the
   mitochondrion's box, read in z-slabs, and the 3-D skeleton length.

The metrics are measured on the mitochondrion's footprint (its voxels in
``labels/volref-mitochondria``): the refined classes there, and the initial classes there, so
the two columns compare the same voxels. The initial classes are those refine refined: volref's
initial labels, or another tool's label image mapped to volref's classes (``refine --labels``). Written to ``volref/metrics.parquet`` (and
``volref/metrics.csv`` on request) and as ``properties`` of the mitochondria label image.

The table has one schema whatever ran before (:data:`~volref.stages.measure.TABLE_DTYPES`:
column order and dtypes; rows in label order), so a fresh, a resumed and a repeated run write
the same bytes. Lengths are micrometres whatever unit the image's axes declare
(:mod:`volref.io.units`); how each axis' unit was read (or assumed) is kept in the table's
metadata (``DataFrame.attrs["volref"]``, which pandas keeps in the parquet file).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr

from volref.engine.grid import Block
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, run_blocks
from volref.io.ngff import set_ome
from volref.io.store import write_file
from volref.io.units import spacing_um
from volref.layout import (
    INITIAL,
    META,
    METRICS_CSV,
    METRICS_TABLE,
    MITOCHONDRIA,
    REFINED,
    finest,
    label_path,
    levels_of,
)
from volref.metrics.consistency import SliceCounts, skeleton_length
from volref.pipeline.blocks import Source
from volref.pipeline.inputs import LabelsIn, refined_input
from volref.pipeline.stage import StageContext, require_done
from volref.pipeline.store import record_provenance
from volref.stages import measure as stage

log = logging.getLogger(__name__)

GROUP = 16  # mitochondria per shape-metric task
SKELETON_VOXELS = 32_000_000  # larger boxes use a coarser level for the 3-D skeleton


@dataclass(frozen=True)
class MeasureJob:
    ids: list[Source]  # every level of labels/volref-mitochondria
    initial: LabelsIn  # what refine refined, as volref's classes
    refined: Source
    spacing: tuple[float, ...]  # z, y, x of level 0, micrometres
    slab: int  # z-slices read at once (the chunk depth)
    manifest: Manifest


# ---------------------------------------------------------------- 1. blockwise statistics


def stats_task(job: MeasureJob, block: Block) -> dict[str, Any]:
    lab = np.asarray(job.ids[0].read(block.start, block.stop, "constant"))
    stats = stage.block_stats(lab, block.start)
    job.manifest.record(f"stats-{block.key}", stats)
    return stats


def merge_stats(parts: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(stage.merge_stats(parts), columns=stage.STATS_COLUMNS)


def as_table(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` in the metrics table's schema: its columns in order and with their dtypes
    (missing ones NaN), rows in label order, a plain index."""
    out = table.reindex(columns=list(stage.TABLE_DTYPES)).astype(stage.TABLE_DTYPES)
    return out.sort_values("label", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- 3. shape metrics


def shape_task(job: MeasureJob, key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = [shape_metrics(job, row) for row in rows]
    job.manifest.record(key, {"rows": out})
    return {"rows": out}


def shape_metrics(job: MeasureJob, row: dict[str, Any]) -> dict[str, Any]:
    """Read one mitochondrion's box in z-slabs and measure it (:mod:`volref.stages.measure`)."""
    label = row["label"]
    lo = [row[f"bbox_{a}0"] for a in "zyx"]
    hi = [row[f"bbox_{a}1"] for a in "zyx"]
    counts = {"initial": SliceCounts(), "refined": SliceCounts()}
    for z in range(lo[0], hi[0], job.slab):
        z1 = min(z + job.slab, hi[0])
        a, b = (z, lo[1], lo[2]), (z1, hi[1], hi[2])
        counts = stage.footprint_counts(
            job.ids[0].read(a, b, "constant"), label,
            {"initial": job.initial.read(a, b),
             "refined": job.refined.read(a, b, "constant")}, counts)
    return stage.shape_row(label, counts, _skeleton(job, label, lo, hi))


def _skeleton(job: MeasureJob, label: int, lo: list[int], hi: list[int]) -> float:
    level = stage.skeleton_level(lo, hi, len(job.ids), SKELETON_VOXELS)
    f = 2**level
    a = (lo[0], lo[1] // f, lo[2] // f)
    b = (hi[0], -(-hi[1] // f), -(-hi[2] // f))
    mask = np.asarray(job.ids[level].read(a, b, "constant")) == label
    sz, sy, sx = job.spacing
    return skeleton_length(mask, (sz, sy * f, sx * f))


# ---------------------------------------------------------------- the stage


@dataclass(frozen=True)
class MeasureStage:
    """The metrics table of every mitochondrion (see the module doc). Its tasks read their
    block (statistics) or one mitochondrion's box (shape metrics)."""

    csv: bool = False
    name: str = "measure"

    def align(self) -> int:
        return 1

    def run(self, ctx: StageContext, executor: Executor,
            observer: Observer | None = None) -> StageReport:
        return measure(ctx, executor, observer=observer, csv=self.csv)


def measure(ctx: StageContext, executor: Executor, *, observer: Observer | None = None,
            csv: bool = False) -> StageReport:
    root, grid, vol = ctx.root, ctx.grid, ctx.vol
    meta = ctx.meta
    spacing, units = spacing_um(vol.scale, vol.units, where=vol.location)
    # measure reads the outputs of every stage before it: all must be whole
    refine = require_done(ctx, "refine", f"{label_path(REFINED)} is", "refine")
    if "segment" in refine.settings():  # refine read the ensemble's labels or uncertainty
        require_done(ctx, "segment", f"{label_path(INITIAL)} is", "segment")
    upstream = require_done(ctx, "instances", f"{label_path(MITOCHONDRIA)} is", "measure")
    ids = [ctx.source(a) for a in levels_of(root[label_path(MITOCHONDRIA)])]
    initial = refined_input(ctx)
    refined = ctx.source(finest(root, label_path(REFINED)))
    manifest = Manifest(meta, "measure")
    record = {"instances": upstream.settings_digest(),
              "segment": Manifest(meta, "segment").settings_digest(), "group": GROUP,
              "spacing_um": list(spacing), "units": units}
    manifest.begin(record, ctx.overwrite)
    record_provenance(root, "measure", record)
    job = MeasureJob(ids, initial, refined, spacing, ids[0].array.chunks[-3], manifest)
    start = time.perf_counter()
    finished = manifest.finished()
    stat_tasks = [BlockTask(f"stats-{b.key}", stats_task, (job, b)) for b in grid]
    stats = run_blocks(executor, "measure: blocks", stat_tasks, finished, observer)
    table = merge_stats([stats.results[t.key] for t in stat_tasks])
    rows = table.to_dict("records")
    groups = [rows[i:i + GROUP] for i in range(0, len(rows), GROUP)]
    shape_tasks = [BlockTask(key, shape_task, (job, key, g))
                   for g in groups for key in [f"mito-{g[0]['label']}-{g[-1]['label']}"]]
    shapes = run_blocks(executor, "measure: mitochondria", shape_tasks, finished, observer)
    metrics = [r for t in shape_tasks for r in shapes.results[t.key]["rows"]]
    if metrics:
        table = table.merge(pd.DataFrame(metrics), on="label", how="left")
    table.insert(2, "volume_um3", table["voxels"] * float(np.prod(spacing)))
    table = as_table(table)
    table.attrs["volref"] = {"spacing_um": list(spacing), **units}
    write_table(root, table, csv)
    report = StageReport("measure", total=len(stat_tasks) + len(shape_tasks),
                         skipped=stats.skipped + shapes.skipped,
                         computed=stats.computed + shapes.computed,
                         seconds=time.perf_counter() - start, results={"table": table})
    manifest.mark_done({**report.to_dict(), "mitochondria": len(table)})
    return report


def write_table(root: zarr.Group, table: pd.DataFrame, csv: bool) -> None:
    """``volref/metrics.parquet`` (+ csv) and the label image's ``properties``."""
    meta = root[META]
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    write_file(meta, METRICS_TABLE, buf.getvalue())
    if csv:
        write_file(meta, METRICS_CSV, table.to_csv(index=False).encode())
    group = root[label_path(MITOCHONDRIA)]
    props = json.loads(table.to_json(orient="records"))  # NaN -> null
    for p in props:
        p["label-value"] = p.pop("label")
    version = "0.5" if root.metadata.zarr_format == 3 else "0.4"
    image_label = {"source": {"image": "../../"}, "properties": props}
    set_ome(group, version, "image-label", image_label)
