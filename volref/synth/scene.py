"""The global geometry of a phantom: mitochondria as tubes around polylines.

A scene is drawn once from the seed, before any voxel exists. It is small (a few thousand
segments) and every chunk renders from the same scene, which is what makes a phantom's voxels
independent of its chunking.

Coordinates are *physical* x/y pixels: a point is ``(z * z_anisotropy, y, x)`` so that
distances are isotropic. A mitochondrion is one main polyline and optional branches; each
segment carries the tube's outer radius at both ends, the intermembrane-space (IMS) thickness and
its arc length, from which :mod:`volref.synth.render` classifies voxels::

        outer membrane ─┐        ┌─ cristae lamella: across the axis, joined to the inner membrane
    ───────────────────┐│ IMS    │
    background        ││ ▓▓▓▓▓▓▓▓│▓▓▓▓▓▓      g = distance to axis - outer radius
    ──── axis ─────────┼┼─ matrix ─┼── s ►    g >= 0          : background
                       ││ ▓▓▓▓▓▓▓▓│▓▓▓▓▓▓     -ims <= g < 0   : IMS
    ───────────────────┘│        │          g < -ims        : matrix or cristae
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from volref.synth.config import SynthConfig

# segment table columns
P0 = slice(0, 3)
P1 = slice(3, 6)
R0, R1, IMS_COL, S0, LEN, POLY, MITO = 6, 7, 8, 9, 10, 11, 12
N_SEG_COLS = 13

STEP_PX = 6.0  # polyline step; tubes are unions of capsules, smooth at this spacing
SEGMENT_STRIDE = 2  # points per rendered segment (12 px segments keep the per-segment box small)


@dataclass(frozen=True)
class Scene:
    """Geometry shared by every chunk of a phantom.

    Attributes
    ----------
    segments
        ``(S, 13)`` float64: p0 (3), p1 (3), r0, r1, ims, s0, length, polyline, mitochondrion.
    boxes
        ``(S, 6)`` int64 voxel boxes ``z0, y0, x0, z1, y1, x1`` (end exclusive) holding the capsule.
    cristae
        One ``(K, 3)`` float64 array per polyline: centre arc length, half thickness, depth
        fraction (how far the lamella reaches from the inner membrane towards the axis).
    degraded
        ``(D, 13)`` segment table of the degraded areas: same columns, ``r0 = r1`` = area radius,
        ``IMS_COL`` = blend strength at the axis, ``POLY`` = area index.
    degraded_boxes
        Voxel boxes of the degraded segments.
    n_mitochondria
        Number of mitochondria; instance ids are ``1..n``.
    """

    segments: np.ndarray
    boxes: np.ndarray
    cristae: tuple[np.ndarray, ...]
    degraded: np.ndarray
    degraded_boxes: np.ndarray
    n_mitochondria: int
    z_anisotropy: float


def build_scene(config: SynthConfig) -> Scene:
    """Draw the mitochondria of a phantom from ``config.seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5C3E]))
    az = config.z_anisotropy
    nz, ny, nx = config.shape
    extent = np.array([nz * az, ny, nx], dtype=np.float64)
    target = int(round(config.density * nz * ny * nx / 1e6))

    # per mitochondrion, per polyline: (points, radii, arc length where cristae may start)
    placed: list[list[tuple[np.ndarray, np.ndarray, float]]] = []
    tree_points = np.empty((0, 3))
    tree_radii = np.empty(0)
    tree = None
    attempts = 0
    while len(placed) < target and attempts < 30 * max(target, 1):
        attempts += 1
        mito = _draw_mitochondrion(rng, config, extent, tree, tree_points, tree_radii)
        if mito is None:
            continue
        placed.append(mito)
        pts = np.concatenate([p for p, _, _ in mito])
        rad = np.concatenate([r for _, r, _ in mito])
        tree_points = np.concatenate([tree_points, pts])
        tree_radii = np.concatenate([tree_radii, rad])
        tree = cKDTree(tree_points)

    segments, cristae = _segment_table(rng, config, placed)
    degraded = _degraded_areas(rng, config, placed)
    return Scene(
        segments=segments,
        boxes=_voxel_boxes(segments, az),
        cristae=tuple(cristae),
        degraded=degraded,
        degraded_boxes=_voxel_boxes(degraded, az),
        n_mitochondria=len(placed),
        z_anisotropy=az,
    )


def _draw_mitochondrion(rng, config, extent, tree, tree_points, tree_radii):
    """One mitochondrion (main polyline + maybe a branch) that keeps clear of the others."""
    lo, hi = config.length_px
    length = float(np.clip(rng.lognormal(np.log(config.median_length_px), 0.6), lo, hi))
    radius = rng.uniform(*config.diameter_px) / 2.0
    start = rng.uniform([0.0, 0.0, 0.0], extent)
    start[0] = _z_centre(rng, extent[0], radius)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    main = _walk(rng, config, extent, start, theta, length, radius, tree, tree_points, tree_radii)
    if main is None:
        return None
    polylines = [(*main, 0.8 * radius)]
    points, radii = main
    n = len(points)
    if rng.random() < config.branch_probability and n >= 12:
        i = int(rng.integers(int(0.25 * n), int(0.75 * n)))
        d = points[min(i + 1, n - 1)] - points[max(i - 1, 0)]
        parent_theta = np.arctan2(d[1], d[2])
        side = rng.choice([-1.0, 1.0])
        btheta = parent_theta + side * rng.uniform(0.9, 1.4)
        blength = max(80.0, rng.uniform(0.3, 0.6) * length)
        bradius = radii[i] * rng.uniform(0.7, 0.95)
        branch = _walk(
            rng, config, extent, points[i].copy(), btheta, blength, bradius,
            tree, tree_points, tree_radii, min_length=60.0,
        )
        if branch is not None:
            # the branch starts on the parent's axis: its lamellae begin beyond the parent's wall
            polylines.append((*branch, radii[i] * 1.3 + 0.5 * bradius))
    return polylines


def _z_centre(rng, z_extent, radius):
    lo, hi = radius, z_extent - radius
    return rng.uniform(lo, hi) if hi > lo else z_extent / 2.0


def _walk(rng, config, extent, start, theta, length, radius, tree, tree_points, tree_radii,
          min_length=None):
    """A smooth random walk, truncated where it would touch another mitochondrion or leave x/y."""
    min_length = config.length_px[0] if min_length is None else min_length
    n_steps = max(2, int(length / STEP_PX))
    wavelength = rng.uniform(150.0, 400.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    zslope = rng.normal(0.0, 0.08)
    z_lo, z_hi = radius, extent[0] - radius
    points = [start]
    p = start.copy()
    for _ in range(n_steps):
        theta += rng.normal(0.0, 0.10)
        zslope = float(np.clip(zslope + rng.normal(0.0, 0.04), -0.25, 0.25))
        step = np.array([zslope, np.sin(theta), np.cos(theta)])
        p = p + STEP_PX * step / np.linalg.norm(step)
        if z_hi > z_lo and not z_lo <= p[0] <= z_hi:  # reflect off the top and bottom of the cell
            p[0] = 2 * z_lo - p[0] if p[0] < z_lo else 2 * z_hi - p[0]
            zslope = -zslope
        if not (0.0 <= p[1] < extent[1] and 0.0 <= p[2] < extent[2]):
            break
        points.append(p.copy())
    points = np.array(points)
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    radii = radius * (1.0 + 0.1 * np.sin(2.0 * np.pi * s / wavelength + phase))
    if tree is not None:
        reach = radii + tree_radii.max() + config.min_gap_px
        for k, (q, r) in enumerate(zip(points, reach)):
            near = tree.query_ball_point(q, r)
            if near:
                dist = np.linalg.norm(tree_points[near] - q, axis=1)
                if np.any(dist < radii[k] + tree_radii[near] + config.min_gap_px):
                    points, radii, s = points[:k], radii[:k], s[:k]
                    break
    if len(points) < 2 or s[-1] < min_length:
        return None
    return points, radii


def _segment_table(rng, config, placed):
    rows, cristae = [], []
    poly = 0
    for mito_index, polylines in enumerate(placed):
        ims = rng.uniform(*config.ims_px)
        for points, radii, cristae_start in polylines:
            idx = np.arange(0, len(points), SEGMENT_STRIDE)
            if idx[-1] != len(points) - 1:
                idx = np.append(idx, len(points) - 1)
            p, r = points[idx], radii[idx]
            seg_len = np.linalg.norm(np.diff(p, axis=0), axis=1)
            s0 = np.concatenate([[0.0], np.cumsum(seg_len)[:-1]])
            for j in range(len(p) - 1):
                rows.append([*p[j], *p[j + 1], r[j], r[j + 1], ims, s0[j], seg_len[j], poly,
                             mito_index])
            cristae.append(_draw_cristae(rng, config, float(seg_len.sum()), float(r.max()),
                                         cristae_start))
            poly += 1
    table = np.array(rows, dtype=np.float64).reshape(-1, N_SEG_COLS)
    return table, cristae


def _draw_cristae(rng, config, length, radius, start):
    """Lamellae across the axis, spaced 8-15 px, kept away from the rounded tips."""
    spacing = rng.uniform(*config.cristae_spacing_px)
    centres = np.arange(start + rng.uniform(0, spacing), length - radius * 0.8, spacing)
    centres = centres + rng.uniform(-0.15, 0.15, len(centres)) * spacing
    half = rng.uniform(*config.cristae_thickness_px, len(centres)) / 2.0
    depth = rng.choice([1.0, 0.75, 0.55], size=len(centres), p=[0.5, 0.3, 0.2])
    return np.stack([centres, half, depth], axis=1).reshape(-1, 3)


def _degraded_areas(rng, config, placed):
    """Low-SNR areas along the skeleton of a few mitochondria (the paper's degradation)."""
    n = len(placed)
    k = int(round(config.degraded_fraction * n))
    if config.degraded_fraction > 0 and n > 0:
        k = max(k, 1)
    chosen = np.sort(rng.choice(n, size=k, replace=False)) if k else np.empty(0, dtype=int)
    rows = []
    for area, m in enumerate(chosen):
        points, radii, _ = placed[m][0]
        s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
        centre = rng.uniform(0.0, s[-1])
        half = rng.uniform(*config.degraded_length_px) / 2.0
        keep = np.flatnonzero((s >= centre - half) & (s <= centre + half))
        if len(keep) < 2:
            j = int(np.clip(np.searchsorted(s, centre), 1, len(s) - 1))
            keep = np.array([j - 1, j])
        reach = 1.6 * radii.max() + 6.0
        strength = rng.uniform(*config.degraded_strength)
        p = points[keep]
        for j in range(len(p) - 1):
            rows.append([*p[j], *p[j + 1], reach, reach, strength, 0.0,
                         float(np.linalg.norm(p[j + 1] - p[j])), area, m])
    return np.array(rows, dtype=np.float64).reshape(-1, N_SEG_COLS)


def _voxel_boxes(segments: np.ndarray, az: float) -> np.ndarray:
    """Integer voxel boxes (end exclusive) that contain each capsule."""
    if len(segments) == 0:
        return np.empty((0, 6), dtype=np.int64)
    r = np.maximum(segments[:, R0], segments[:, R1])[:, None]
    lo = np.minimum(segments[:, P0], segments[:, P1]) - r
    hi = np.maximum(segments[:, P0], segments[:, P1]) + r
    scale = np.array([az, 1.0, 1.0])
    lo = np.floor(lo / scale).astype(np.int64)
    hi = np.floor(hi / scale).astype(np.int64) + 1
    return np.concatenate([lo, hi], axis=1)
