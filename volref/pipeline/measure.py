"""``measure``: one row per mitochondrion, for the initial and the refined segmentation.

1. per block (tasks, recorded): voxel counts, coordinate sums and bounding boxes of the ids in
   the block — statistics that merge by adding and by min/max;
2. here: merge them into one row per id (voxels, box, centroid);
3. per group of mitochondria (tasks, recorded): the paper's five metrics on each z-slice of the
   mitochondrion's box, read in z-slabs, and the 3-D skeleton length.

The metrics are measured on the mitochondrion's footprint (its voxels in
``labels/volref-mitochondria``): the refined classes there, and the initial classes there, so
the two columns compare the same voxels. Written to ``volref/metrics.parquet`` (and
``volref/metrics.csv`` on request) and as ``properties`` of the mitochondria label image.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import zarr

from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, run_blocks
from volref.io import Volume
from volref.io.ngff import set_ome
from volref.io.store import write_file
from volref.metrics.consistency import SliceCounts, skeleton_length, slice_counts
from volref.pipeline.blocks import Source, require_done
from volref.pipeline.instances import MITOCHONDRIA
from volref.pipeline.refine import REFINED
from volref.pipeline.segment import INITIAL, levels_of
from volref.pipeline.store import record_provenance

log = logging.getLogger(__name__)

GROUP = 16  # mitochondria per shape-metric task
SKELETON_VOXELS = 32_000_000  # larger boxes use a coarser level for the 3-D skeleton


@dataclass(frozen=True)
class MeasureJob:
    ids: list[Source]  # every level of labels/volref-mitochondria
    initial: Source
    refined: Source
    spacing: tuple[float, float, float]  # z, y, x of level 0 (physical units)
    slab: int  # z-slices read at once (the chunk depth)
    manifest: Manifest


# ---------------------------------------------------------------- 1. blockwise statistics


def stats_task(job: MeasureJob, block: Block) -> dict[str, Any]:
    lab = np.asarray(job.ids[0].read(block.start, block.stop, "zero"))
    stats = block_stats(lab, block.start)
    job.manifest.record(f"stats-{block.key}", stats)
    return stats


def block_stats(lab: np.ndarray, start) -> dict[str, Any]:
    """Per id in a block: voxels, coordinate sums, box (inclusive min, exclusive max)."""
    flat = np.flatnonzero(lab)
    if flat.size == 0:
        return {"ids": [], "count": [], "sum": [], "min": [], "max": []}
    vals = lab.ravel()[flat]
    order = np.argsort(vals, kind="stable")
    vals = vals[order]
    coords = np.stack(np.unravel_index(flat[order], lab.shape), axis=1) + np.asarray(start)
    ids, first = np.unique(vals, return_index=True)
    counts = np.diff(np.append(first, len(vals)))
    return {"ids": ids.tolist(), "count": counts.tolist(),
            "sum": np.add.reduceat(coords.astype(np.float64), first).tolist(),
            "min": np.minimum.reduceat(coords, first).tolist(),
            "max": (np.maximum.reduceat(coords, first) + 1).tolist()}


def merge_stats(parts: list[dict[str, Any]]) -> pd.DataFrame:
    acc: dict[int, list] = {}
    for part in parts:
        for i, n, s, lo, hi in zip(part["ids"], part["count"], part["sum"], part["min"],
                                   part["max"]):
            if i not in acc:
                acc[i] = [0, np.zeros(3), np.array(lo), np.array(hi)]
            a = acc[i]
            a[0] += n
            a[1] += s
            a[2] = np.minimum(a[2], lo)
            a[3] = np.maximum(a[3], hi)
    rows = []
    for i in sorted(acc):
        n, s, lo, hi = acc[i]
        rows.append({"label": i, "voxels": n,
                     **{f"bbox_{a}0": int(v) for a, v in zip("zyx", lo)},
                     **{f"bbox_{a}1": int(v) for a, v in zip("zyx", hi)},
                     **{f"centroid_{a}": float(v) / n for a, v in zip("zyx", s)}})
    columns = ["label", "voxels"] + [f"bbox_{a}{e}" for e in "01" for a in "zyx"] + \
        [f"centroid_{a}" for a in "zyx"]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------- 3. shape metrics


def shape_task(job: MeasureJob, key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = [shape_metrics(job, row) for row in rows]
    job.manifest.record(key, {"rows": out})
    return {"rows": out}


def shape_metrics(job: MeasureJob, row: dict[str, Any]) -> dict[str, Any]:
    label = row["label"]
    lo = [row[f"bbox_{a}0"] for a in "zyx"]
    hi = [row[f"bbox_{a}1"] for a in "zyx"]
    counts = {"initial": SliceCounts(), "refined": SliceCounts()}
    for z in range(lo[0], hi[0], job.slab):
        z1 = min(z + job.slab, hi[0])
        a, b = (z, lo[1], lo[2]), (z1, hi[1], hi[2])
        foot = np.asarray(job.ids[0].read(a, b, "zero")) == label
        for name, src in (("initial", job.initial), ("refined", job.refined)):
            classes = np.where(foot, np.asarray(src.read(a, b, "zero")), 0)
            for k in range(classes.shape[0]):
                counts[name] = counts[name] + slice_counts(classes[k])
    out: dict[str, Any] = {"label": label,
                           "skeleton_length_um": _skeleton(job, label, lo, hi)}
    for name, c in counts.items():
        for metric, value in c.metrics().items():
            out[f"{name}_{metric}"] = value
    return out


def _skeleton(job: MeasureJob, label: int, lo: list[int], hi: list[int]) -> float:
    voxels = math.prod(b - a for a, b in zip(lo, hi))
    level = 0
    while voxels / 4**level > SKELETON_VOXELS and level + 1 < len(job.ids):
        level += 1
    f = 2**level
    a = (lo[0], lo[1] // f, lo[2] // f)
    b = (hi[0], -(-hi[1] // f), -(-hi[2] // f))
    mask = np.asarray(job.ids[level].read(a, b, "zero")) == label
    sz, sy, sx = job.spacing
    return skeleton_length(mask, (sz, sy * f, sx * f))


# ---------------------------------------------------------------- the stage


def measure(vol: Volume, root: zarr.Group, grid: BlockGrid, executor: Executor, *,
            observer: Observer | None = None, overwrite: bool = False,
            csv: bool = False) -> StageReport:
    meta = root.require_group("volref")
    upstream = require_done(meta, "instances", f"labels/{MITOCHONDRIA} is", "measure")
    ms = vol.multiscale
    lead = (0,) * (ms.ndim - 3)
    ids = [Source(a, lead) for a in levels_of(root["labels"][MITOCHONDRIA])]
    initial = Source(levels_of(root["labels"][INITIAL])[0], lead)
    refined = Source(levels_of(root["labels"][REFINED])[0], lead)
    manifest = Manifest(meta, "measure")
    record = {"instances": upstream.settings_digest(),
              "segment": Manifest(meta, "segment").settings_digest(), "group": GROUP}
    manifest.begin(record, overwrite)
    record_provenance(root, "measure", record)
    job = MeasureJob(ids, initial, refined, vol.scale, ids[0].array.chunks[-3], manifest)
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
    table.insert(2, "volume_um3", table["voxels"] * float(np.prod(vol.scale)))
    write_table(root, table, csv)
    report = StageReport("measure", total=len(stat_tasks) + len(shape_tasks),
                         skipped=stats.skipped + shapes.skipped,
                         computed=stats.computed + shapes.computed,
                         seconds=time.perf_counter() - start, results={"table": table})
    manifest.mark_done({**report.to_dict(), "mitochondria": len(table)})
    return report


def write_table(root: zarr.Group, table: pd.DataFrame, csv: bool) -> None:
    """``volref/metrics.parquet`` (+ csv) and the label image's ``properties``."""
    meta = root["volref"]
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    write_file(meta, "metrics.parquet", buf.getvalue())
    if csv:
        write_file(meta, "metrics.csv", table.to_csv(index=False).encode())
    group = root["labels"][MITOCHONDRIA]
    props = json.loads(table.to_json(orient="records"))  # NaN -> null
    for p in props:
        p["label-value"] = p.pop("label")
    version = "0.5" if root.metadata.zarr_format == 3 else "0.4"
    image_label = {"source": {"image": "../../"}, "properties": props}
    set_ome(group, version, "image-label", image_label)
