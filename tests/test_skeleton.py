"""The 3-D skeleton length (:mod:`volref.metrics.skeleton`) against the true length of tubes
(thin and thick, cubic and deep voxels, smooth and ragged), of the phantoms' mitochondria, and
against skan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import zarr
from scipy import ndimage
from scipy.sparse.csgraph import minimum_spanning_tree
from skimage.morphology import skeletonize

from volref.metrics.skeleton import (
    branches,
    centre_line,
    ridge_path,
    skeleton_graph,
    skeleton_length,
)
from volref.synth.config import SynthConfig
from volref.synth.render import render_box
from volref.synth.scene import LEN, MITO, build_scene


def tube(points, radius: float, shape, spacing=(1.0, 1.0, 1.0)):
    """A tube of ``radius`` around the polyline ``points`` (physical z, y, x) and its length."""
    grid = np.stack(np.indices(shape), axis=-1).astype(float) * np.asarray(spacing)
    mask = np.zeros(shape, dtype=bool)
    pts = np.asarray(points, dtype=float)
    for a, b in zip(pts[:-1], pts[1:]):
        d = b - a
        t = np.clip(((grid - a) @ d) / (d @ d), 0, 1)
        mask |= np.linalg.norm(grid - (a + t[..., None] * d), axis=-1) <= radius
    return mask, float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())


ARC = np.linspace(0, np.pi, 60)
TURN = np.linspace(0, 1.5 * np.pi, 80)
TUBES = {
    "along x": ([(10, 20, 10), (10, 20, 110)], 5, (20, 40, 120), (1, 1, 1)),
    "oblique in the plane": ([(10, 10, 10), (10, 90, 70)], 5, (20, 100, 80), (1, 1, 1)),
    "oblique in 3-D": ([(8, 10, 10), (30, 70, 90)], 4, (40, 80, 100), (1, 1, 1)),
    "half circle": ([(10, 50 + 40 * np.sin(t), 50 + 40 * np.cos(t)) for t in ARC], 5,
                    (20, 100, 100), (1, 1, 1)),
    "helix": ([(10 + 3 * t, 40 + 25 * np.sin(t), 40 + 25 * np.cos(t)) for t in TURN], 4,
              (30, 80, 80), (1, 1, 1)),
}


@pytest.mark.parametrize("name", list(TUBES))
def test_length_of_straight_and_curved_tubes_within_5_percent(name):
    points, radius, shape, spacing = TUBES[name]
    mask, true = tube(points, radius, shape, spacing)
    assert skeleton_length(mask, spacing) == pytest.approx(true, rel=0.05)


def test_oblique_tube_with_coarse_z_voxels_within_5_percent():
    """z voxels 2.5x coarser, as in pan-ExM stacks: measured on cubic voxels, the digital steps
    along z no longer overstate the length (skan on the anisotropic skeleton: +22 %)."""
    spacing = (2.5, 1.0, 1.0)
    mask, true = tube([(25, 20, 10), (50, 60, 90)], 6, (30, 80, 100), spacing)
    assert skeleton_length(mask, spacing) == pytest.approx(true, rel=0.05)


def test_thick_and_thin_tubes_of_one_length_measure_alike():
    """The length of a tube's axis, whatever its thickness: a tube 24 voxels across and one 6
    voxels across, 100 voxels long, oblique in 3-D."""
    axis = [(14, 20, 20), (34, 60, 105)]
    thin, true = tube(axis, 3, (48, 80, 125))
    thick, _ = tube(axis, 12, (48, 80, 125))
    a, b = skeleton_length(thin), skeleton_length(thick)
    assert a == pytest.approx(true, rel=0.05) and b == pytest.approx(true, rel=0.05)
    assert a == pytest.approx(b, rel=0.05)


def test_short_thick_capsule_measures_its_axis_not_tip_to_tip():
    """A capsule 20 voxels of axis and 20 across (40 tip to tip): the centre line ends at the
    centres of its tips."""
    mask, true = tube([(20, 25, 25), (20, 25, 45)], 10, (40, 50, 70))
    assert true == 20 and skeleton_length(mask) == pytest.approx(true, rel=0.10)


def test_tube_flattened_by_the_stack_reaches_its_tips():
    """A tube 24 across in a stack 13 deep (cut at its top and bottom, as thick mitochondria in
    a thin stack): the distance transform at its ends is half the depth, the tips' rounding
    the tube's half-width; thinning alone stops 5 % short here."""
    mask, true = tube([(6, 30, 20), (6, 30, 100)], 12, (13, 60, 120))
    line = centre_line(mask)
    assert line.length() == pytest.approx(true, rel=0.05)
    assert sum(line.tip_gaps()) > 0


@pytest.mark.parametrize("radius", [3, 8])
def test_z_voxels_4x_coarser_give_the_same_length(radius):
    """The same curved tube drawn on cubic voxels and on voxels 4x deeper in z."""
    points = [(20 + 8 * np.sin(t), 40 + 25 * np.sin(t), 15 + 30 * t) for t in ARC[::4]]
    cubic, true = tube(points, radius, (40, 80, 125))
    deep, _ = tube(points, radius, (10, 80, 125), (4.0, 1.0, 1.0))
    a, b = skeleton_length(cubic), skeleton_length(deep, (4.0, 1.0, 1.0))
    assert a == pytest.approx(true, rel=0.05)
    assert b == pytest.approx(a, rel=0.05)


def ragged(mask: np.ndarray, seed: int) -> np.ndarray:
    """``mask`` as a segmentation may leave it: enclosed cavities, tunnels along z through it
    and notches in its surface (balls and rods of background of 1-3 voxels radius)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(mask.shape)
    inside = np.argwhere(ndimage.binary_erosion(mask, iterations=3))
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    out = mask.copy()
    for kind, where, n in (("cavity", inside, 25), ("tunnel", inside, 10), ("notch", surface, 40)):
        for centre in where[rng.choice(len(where), n, replace=False)]:
            r = rng.uniform(1.0, 3.0)
            axes = (1, 2) if kind == "tunnel" else (0, 1, 2)
            d2 = sum((grid[a] - centre[a]) ** 2 for a in axes)
            out &= d2 > r * r
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_thick_tube_measures_its_axis(seed):
    """A thick tube with cavities, tunnels and notches: a thinning keeps a surface around each
    cavity and a loop around each tunnel (a 18 µm mitochondrion of the demo measured 1,045 µm);
    filled, closed and pruned, the length stays that of the axis."""
    mask, true = tube([(15, 30, 15), (15, 50, 115)], 11, (30, 80, 130))
    assert skeleton_length(ragged(mask, seed)) == pytest.approx(true, rel=0.10)


def test_spurs_shorter_than_the_radius_are_pruned_real_branches_kept():
    """A tube of radius 8 with a bump (a spur's length < the radius) and a branch 40 long."""
    shape = (24, 60, 130)
    main, main_len = tube([(12, 20, 15), (12, 20, 115)], 8, shape)
    bump, _ = tube([(12, 20, 40), (12, 27, 40)], 3, shape)
    branch, branch_len = tube([(12, 20, 80), (12, 52, 80)], 5, shape)
    assert skeleton_length(main | bump) == pytest.approx(main_len, rel=0.05)
    # the branch's centre line starts on the main axis
    assert skeleton_length(main | branch) == pytest.approx(main_len + branch_len, rel=0.08)


def test_centre_line_is_one_voxel_thick_and_the_same_for_any_crop():
    mask, _ = tube([(8, 10, 10), (20, 40, 70)], 5, (30, 50, 80))
    a = centre_line(mask)
    assert a is not None and a.skeleton.any()
    assert skeleton_length(np.pad(mask, ((3, 0), (0, 5), (7, 2)))) == skeleton_length(mask)
    assert skeleton_length(np.zeros((4, 4, 4), bool)) == 0.0


def test_thick_blob_counts_a_tree_not_every_neighbour_pair():
    """A flat, thick blob (a mitochondrion a few slices deep): the length of the tree through
    its centre line is what skan measures on the same voxels."""
    skan = pytest.importorskip("skan")
    z, y, x = np.indices((9, 50, 70))
    mask = ((y - 25) / 18.0) ** 2 + ((x - 35) / 28.0) ** 2 + ((z - 4) / 3.2) ** 2 <= 1
    line = centre_line(mask)
    reference = float(skan.Skeleton(line.skeleton, spacing=line.spacing).path_lengths().sum())
    assert line.length(tips=False) == pytest.approx(reference, rel=0.10)


def test_branches_cover_every_edge_once():
    skel = np.zeros((3, 9, 9), dtype=bool)
    skel[1, 4, :] = True  # a cross: four arms from one junction
    skel[1, :, 4] = True
    coords, graph = skeleton_graph(skel)
    tree = minimum_spanning_tree(graph)  # the diagonal links at the junction drop out
    paths = branches(tree + tree.T)
    assert len(paths) == 4 and sum(len(p) - 1 for p in paths) == len(coords) - 1


# ---------------------------------------------------------------- phantoms

#: phantoms with mitochondria whose centre lines are known (:mod:`volref.synth.scene`): thin
#: tubes that fit in the stack's depth, and the default thick ones, cut by its top and bottom
THIN = SynthConfig(shape=(24, 128, 128), density=40.0, diameter_px=(10.0, 20.0),
                   length_px=(40.0, 200.0), median_length_px=90.0, min_gap_px=4.0,
                   degraded_fraction=0.0, chunks=(24, 128, 128))
THICK = SynthConfig(shape=(16, 384, 384), density=4.0, degraded_fraction=0.0,
                    chunks=(16, 384, 384))


def phantom_mitochondria(config: SynthConfig, seed: int):
    """(mask, true centre-line length in µm) of each mitochondrion of a phantom that does not
    touch its y/x edges (at an edge the centre line stops about a radius inside the cut),
    rendered in its own box."""
    config = dataclasses.replace(config, seed=seed)
    scene = build_scene(config)
    for i in range(scene.n_mitochondria):
        mine = scene.segments[:, MITO] == i
        lo = np.maximum(scene.boxes[mine, :3].min(axis=0), 0)
        hi = np.minimum(scene.boxes[mine, 3:].max(axis=0), config.shape)
        if np.any(lo[1:] == 0) or np.any(hi[1:] == np.asarray(config.shape[1:])):
            continue
        ids = render_box(scene, config, lo.tolist(), hi.tolist()).instances
        true = scene.segments[mine, LEN].sum() * config.voxel_size_um[2]
        yield ids == i + 1, float(true)


@pytest.mark.parametrize("config,seeds", [(THIN, (1, 2, 3)), (THICK, (1, 4, 6))],
                         ids=["thin", "thick"])
def test_phantom_mitochondria_within_15_percent_of_their_centre_lines(config, seeds):
    """Measured/true: 0.96-1.01 on the thin tubes, 0.93-0.99 on the thick ones; without
    carrying the free ends on to the tips' centres 0.85-0.99 and 0.85-0.98 (thinning stops
    short of the tips, most where the stack's top and bottom flatten a thick tube). 15 %:
    twice the worst seen, for other seeds and platforms' rounding."""
    ratios = [skeleton_length(mask, config.voxel_size_um) / true
              for seed in seeds for mask, true in phantom_mitochondria(config, seed)]
    assert len(ratios) >= 5
    assert np.all(np.abs(np.asarray(ratios) - 1) <= 0.15), np.round(ratios, 2)


def test_within_10_percent_of_skan_on_phantom_mitochondria(small_phantom):
    """skan measures the same centre line (its voxels, on cubic voxels; before its free ends
    are carried on to the tips) alike."""
    skan = pytest.importorskip("skan")
    from volref.io import open_image

    vol = open_image(small_phantom)
    ids = zarr.open_group(small_phantom, mode="r")["labels/ground-truth-instances/s0"][:]
    ours, theirs = [], []
    for label in np.unique(ids[ids > 0]):
        box = ndimage.find_objects((ids == label).astype(np.uint8))[0]
        line = centre_line(ids[box] == label, vol.scale)
        if line is None or line.skeleton.sum() < 2:
            continue
        ours.append(line.length(tips=False))
        theirs.append(float(skan.Skeleton(line.skeleton, spacing=line.spacing)
                            .path_lengths().sum()))
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert len(ours) >= 3
    ratio = ours / theirs
    assert np.all(np.abs(ratio - 1) <= 0.10), ratio


def test_a_piece_thinning_deletes_still_gets_its_centre_line():
    """scikit-image's 3-D thinning deletes some thick plates entirely (a 10 x 3 x 30 box: no
    voxel left); the piece's ridge path stands in: from tip to tip through its middle,
    less a radius at each end."""
    plate = np.zeros((16, 12, 40), dtype=bool)
    plate[3:13, 4:7, 5:35] = True
    assert not skeletonize(plate, method="lee").any()  # the thinning's loss this guards
    assert 24 <= skeleton_length(plate) <= 33
    mask, true = tube([(10, 15, 10), (14, 30, 60)], 6, (25, 45, 75))
    clean = np.pad(mask, 1)
    path = ridge_path(clean, ndimage.distance_transform_edt(clean), (1.0, 1.0, 1.0))
    length = float(np.linalg.norm(np.diff(path, axis=0), axis=1).sum())
    assert length == pytest.approx(true, rel=0.10)
