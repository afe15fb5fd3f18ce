"""Consistency metrics on hand-drawn masks whose values can be counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volref.metrics.consistency import (
    CRISTAE,
    IMS,
    MATRIX,
    edges,
    skeleton_length,
    skeleton_topology,
    slice_counts,
    tile_metrics,
)


def mito(h: int = 30, w: int = 60, ims: bool = True) -> np.ndarray:
    """A rectangle of matrix, with a 2-px IMS rim when ``ims``."""
    a = np.zeros((h + 10, w + 10), dtype=np.uint8)
    a[5:5 + h, 5:5 + w] = IMS if ims else MATRIX
    if ims:
        a[7:3 + h, 7:3 + w] = MATRIX
    return a


def test_straight_bar_has_two_end_points_and_no_cycle():
    bar = np.zeros((20, 40), dtype=bool)
    bar[8:12, 5:35] = True
    assert skeleton_topology(bar) == (2, 0)


def test_ring_has_one_cycle():
    yy, xx = np.mgrid[:41, :41]
    r = np.hypot(yy - 20, xx - 20)
    ring = (r > 10) & (r < 15)
    ends, cycles = skeleton_topology(ring)
    assert (ends, cycles) == (0, 1)


def test_missing_ims_gives_100_percent_inner_membrane_background():
    m = tile_metrics(mito(ims=False), pad=True)
    assert m["inner_membrane_background_ratio"] == 100.0
    assert tile_metrics(mito(ims=True), pad=True)["inner_membrane_background_ratio"] == 0.0


def test_boundary_area_ratio_of_a_rectangle():
    m = tile_metrics(mito(h=30, w=60), pad=True)
    assert m["boundary_area_ratio"] == pytest.approx(100 * 2 * (30 + 60) / (30 * 60))


def test_detached_cristae_raise_the_cristae_ratio():
    attached = mito()
    attached[7:33, 30:33] = CRISTAE  # a lamella from inner membrane to inner membrane
    detached = attached.copy()
    detached[5:7, 30:33] = CRISTAE  # ... that now reaches into the IMS ring (leaks out)
    detached[7:10, 30:33] = MATRIX
    a = tile_metrics(attached, pad=True)["cristae_boundary_ratio"]
    d = tile_metrics(detached, pad=True)["cristae_boundary_ratio"]
    assert d > a


def test_empty_and_one_pixel_masks():
    empty = np.zeros((16, 16), dtype=np.uint8)
    m = tile_metrics(empty)
    assert m["skeleton_end_points"] == 0 and math.isnan(m["boundary_area_ratio"])
    one = empty.copy()
    one[8, 8] = MATRIX
    c = slice_counts(one)
    assert c.area == 1 and c.outline == 4 and c.inner_background == 4 and c.cycles == 0


def test_edges_counts_each_side_once():
    a = np.zeros((3, 3), dtype=bool)
    a[1, 1] = True
    assert edges(a, ~a) == 4


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(0, 3), dy=st.integers(0, 6),
       dx=st.integers(0, 6))
def test_metrics_do_not_change_under_translation_and_rotation(seed, k, dy, dx):
    rng = np.random.default_rng(seed)
    tile = np.zeros((40, 40), dtype=np.uint8)
    tile[10:26, 10:26] = IMS
    tile[12:24, 12:24] = MATRIX
    tile[12:24, 17:19] = CRISTAE
    tile[rng.integers(12, 24), rng.integers(12, 24)] = IMS
    base = slice_counts(tile)
    moved = np.roll(np.rot90(tile, k), (dy, dx), axis=(0, 1))
    assert slice_counts(moved) == base


def test_skeleton_length_of_a_straight_tube():
    mask = np.zeros((5, 9, 40), dtype=bool)
    mask[1:4, 3:6, 5:35] = True
    length = skeleton_length(mask, spacing=(2.0, 0.5, 0.5))
    assert 0.5 * 20 <= length <= 0.5 * 31
