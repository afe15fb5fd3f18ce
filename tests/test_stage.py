"""The stage protocol's parts on their own: halos declared from settings, measure's pure array
functions."""

from __future__ import annotations

import numpy as np

from volref.engine.grid import BlockGrid
from volref.metrics.consistency import SliceCounts, slice_counts
from volref.pipeline.refine import CRF_MARGIN, RefineStage
from volref.pipeline.segment import SegmentStage
from volref.pipeline.stage import Halo, tasks_of
from volref.stages import measure
from volref.stages.settings import SegmentSettings


def test_halo_regions_round_to_tiles_and_tasks_declare_them():
    grid = BlockGrid((10, 300, 200), (5, 256, 128))
    halo = SegmentStage(SegmentSettings(tile=64, halo=16)).halo()
    assert halo == Halo((1, 16, 16), (1, 16, 16), (1, 64, 64))
    last = grid[(1, 1, 1)]  # (5, 256, 128) .. (10, 300, 200): y 44, x 72 px -> 1, 2 tiles
    assert halo.region(last) == ((4, 240, 112), (11, 336, 272))
    tasks = tasks_of(grid, print, "job", halo)
    assert [t.writes for t in tasks] == [(b.start, b.stop) for b in grid]
    assert tasks[-1].reads == halo.region(last)
    crf = RefineStage(method="crf").halo(RefineStage().settings, ("", ""))
    assert crf.region(last) == ((5, 256 - CRF_MARGIN, 128 - CRF_MARGIN),
                                (10, 300 + CRF_MARGIN, 200 + CRF_MARGIN))


def test_blockwise_stats_merge_to_the_whole_volume():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, (6, 10, 12)).astype(np.uint32)
    parts = [measure.block_stats(ids[:, :, :5], (0, 0, 0)),
             measure.block_stats(ids[:, :, 5:], (0, 0, 5))]
    rows = measure.merge_stats(parts)
    whole = measure.merge_stats([measure.block_stats(ids, (0, 0, 0))])
    assert rows == whole and [r["label"] for r in rows] == [1, 2, 3]
    for r in rows:
        zz, yy, xx = np.nonzero(ids == r["label"])
        assert r["voxels"] == zz.size and r["bbox_x1"] == xx.max() + 1
        assert np.isclose(r["centroid_y"], yy.mean())
    assert list(rows[0]) == measure.STATS_COLUMNS


def test_footprint_counts_see_only_the_mitochondrion():
    ids = np.zeros((2, 8, 8), np.uint32)
    ids[:, 2:6, 2:6] = 7
    classes = np.full((2, 8, 8), 2, np.uint8)  # a class everywhere, the footprint keeps a box
    got = measure.footprint_counts(ids, 7, {"a": classes}, {"a": SliceCounts()})["a"]
    want = SliceCounts()
    for k in range(2):
        want = want + slice_counts(np.where(ids[k] == 7, classes[k], 0))
    assert got == want and got != SliceCounts()
    assert measure.skeleton_level((0, 0, 0), (10, 3000, 3000), 4, 32_000_000) == 1
    assert measure.skeleton_level((0, 0, 0), (10, 40, 40), 4, 32_000_000) == 0
