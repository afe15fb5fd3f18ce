"""Per-mitochondrion measurements on numpy arrays: what :mod:`volref.pipeline.measure` maps.

* :func:`block_stats` — per id in a block: voxels, coordinate sums, bounding box; statistics that
  merge by adding and by min/max (:func:`merge_stats`), so blocks are measured independently;
* :func:`footprint_counts` — the paper's per-slice counts of one mitochondrion's classes, on its
  footprint (its voxels in the instance image), for a slab of its box;
* :func:`skeleton_level` — the pyramid level whose box is small enough for the 3-D skeleton.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from volref.metrics.consistency import METRICS, SliceCounts, slice_counts

#: columns of the merged statistics, in table order
STATS_COLUMNS = (["label", "voxels"] + [f"bbox_{a}{e}" for e in "01" for a in "zyx"]
                 + [f"centroid_{a}" for a in "zyx"])
#: the segmentations measured on each mitochondrion's footprint
SEGMENTATIONS = ("initial", "refined")
#: columns of a shape-metric row (:func:`shape_row`), in table order
SHAPE_COLUMNS = ["skeleton_length_um"] + [f"{s}_{m}" for s in SEGMENTATIONS for m in METRICS]
#: every column of the metrics table, in order, with its dtype: the same schema for a fresh, a
#: resumed and a repeated run (rows read back from records come with their keys sorted)
TABLE_DTYPES: dict[str, str] = {
    "label": "int64", "voxels": "int64", "volume_um3": "float64",
    **{c: "int64" for c in STATS_COLUMNS if c.startswith("bbox_")},
    **{c: "float64" for c in STATS_COLUMNS if c.startswith("centroid_")},
    **{c: "float64" for c in SHAPE_COLUMNS},
}


def block_stats(lab: np.ndarray, start: Sequence[int]) -> dict[str, Any]:
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


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per id (``STATS_COLUMNS``), in id order, from the blocks' statistics."""
    acc: dict[int, list[Any]] = {}  # count, coordinate sum, min, max
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
    return rows


def footprint_counts(ids: np.ndarray, label: int, classes: Mapping[str, np.ndarray],
                     counts: Mapping[str, SliceCounts]) -> dict[str, SliceCounts]:
    """``counts`` plus each z-slice of a slab: the classes of each segmentation in ``classes``
    (all shaped as ``ids``) where ``ids == label``, background elsewhere."""
    foot = np.asarray(ids) == label
    out = dict(counts)
    for name, lab in classes.items():
        kept = np.where(foot, np.asarray(lab), 0)
        for k in range(kept.shape[0]):
            out[name] = out[name] + slice_counts(kept[k])
    return out


def shape_row(label: int, counts: Mapping[str, SliceCounts], skeleton_um: float) -> dict[str, Any]:
    """A mitochondrion's row of shape metrics: ``<segmentation>_<metric>`` and skeleton length."""
    out: dict[str, Any] = {"label": label, "skeleton_length_um": skeleton_um}
    for name, c in counts.items():
        for metric, value in c.metrics().items():
            out[f"{name}_{metric}"] = value
    return out


def skeleton_level(lo: Sequence[int], hi: Sequence[int], levels: int, max_voxels: int) -> int:
    """The finest level (x/y halved per level) where the box ``[lo, hi)`` has at most
    ``max_voxels`` voxels, or the coarsest of ``levels``."""
    voxels = math.prod(b - a for a, b in zip(lo, hi))
    level = 0
    while voxels / 4**level > max_voxels and level + 1 < levels:
        level += 1
    return level
