"""Render any box of a phantom from its scene, with the same voxels for any chunking.

Three things make a box's voxels independent of where the box starts and ends:

1. Geometry is a pointwise function of global voxel coordinates and the scene; capsule distances
   are evaluated per segment in one global order with a strict ``<`` (ties go to the earlier
   segment), so every voxel sees the same floating-point operations in every box.
2. Random numbers come from counter-based streams (Philox) keyed by ``(seed, stream)`` with one
   counter per global *cell* of ``1 x 64 x 64`` voxels, so a voxel's noise never depends on which
   other voxels are drawn with it. Boxes are widened to whole cells before noise is drawn.
3. The point-spread blur is separable; a box is rendered with a halo of at least the kernel
   radius along each axis, so the blurred interior is computed from the same inputs in the same
   order as in any other box.

Regions, for one requested box ``[lo, hi)``::

    ext  ┌────────────────────────────┐  core ± halo: clean image, then blur
    core │ ┌────────────────────────┐ │  [lo, hi) widened to whole 64-px cells in y, x:
         │ │   box [lo, hi)         │ │  degradation and Poisson-Gaussian noise per cell
         │ └────────────────────────┘ │
         └────────────────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.synth.config import SynthConfig
from volref.synth.scene import IMS_COL, LEN, MITO, P0, P1, POLY, R0, R1, S0, Scene

_FACES = ndimage.generate_binary_structure(3, 1)
CELL = 64  # y/x size of a noise cell; cells are one z-slice thick
TRUNCATE = 4.0  # blur kernel radius in sigmas
GAIN_ADU = 8.0  # detector gain, ADU per photon

# streams of the counter-based generator
TEXTURE, DEGRADE_NOISE, PHOTONS, READ_NOISE = 1, 2, 3, 4

# clean intensities (fractions of the peak photon budget)
BG_LEVEL, BG_TEXTURE = 0.28, 0.30
MEMBRANE, IMS_LEVEL = 0.50, 0.10
MATRIX_LEVEL, MATRIX_TEXTURE, CRISTAE_LEVEL = 0.62, 0.15, 0.92


@dataclass
class Rendered:
    """The arrays of one box. ``image`` is uint16 counts, the others ground truth."""

    image: np.ndarray  # uint16
    classes: np.ndarray  # uint8, 0 background, 1 IMS, 2 cristae, 3 matrix
    instances: np.ndarray  # uint32, 0 background, 1..N mitochondria
    degraded: np.ndarray  # uint8, 1 where the SNR was lowered


def halo(config: SynthConfig) -> tuple[int, int, int]:
    """Voxels of margin the blur needs on each side, per axis (scipy's kernel radius)."""
    rz = int(TRUNCATE * config.psf_sigma_z_vox + 0.5)
    rxy = int(TRUNCATE * config.psf_sigma_px + 0.5)
    return (rz, rxy, rxy)


def render_box(scene: Scene, config: SynthConfig, lo, hi) -> Rendered:
    """Render the phantom voxels ``[lo, hi)`` (global voxel coordinates, z y x)."""
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    h = np.array(halo(config), dtype=np.int64)
    core_lo = np.array([lo[0], (lo[1] // CELL) * CELL, (lo[2] // CELL) * CELL])
    core_hi = np.array([hi[0], -(-hi[1] // CELL) * CELL, -(-hi[2] // CELL) * CELL])
    ext_lo, ext_hi = core_lo - h, core_hi + h

    geo = _geometry(scene, ext_lo, ext_hi)
    classes, cristae = _classify(scene, geo)
    clean = _clean_intensity(config, classes, cristae, geo, ext_lo, ext_hi)
    blurred = ndimage.gaussian_filter(
        clean,
        sigma=(config.psf_sigma_z_vox, config.psf_sigma_px, config.psf_sigma_px),
        truncate=TRUNCATE,
        mode="nearest",
    )
    core = tuple(slice(int(a), int(b)) for a, b in zip(h, h + core_hi - core_lo))
    signal = blurred[core]

    weight = _degradation_weight(scene, core_lo, core_hi)
    if weight is not None:
        noise = _cell_field(config, DEGRADE_NOISE, core_lo, core_hi, "normal")
        signal = (1.0 - weight) * signal + weight * (BG_LEVEL + config.degraded_noise * noise)
    z = np.arange(core_lo[0], core_hi[0], dtype=np.float64)
    bleach = config.bleach_floor ** (z / max(config.shape[0] - 1, 1))
    signal = signal * bleach.astype(np.float32)[:, None, None]
    image = _detector(config, signal, core_lo, core_hi)

    inner = tuple(slice(int(a), int(b)) for a, b in zip(h + lo - core_lo, h + hi - core_lo))
    out = tuple(slice(int(a), int(b)) for a, b in zip(lo - core_lo, hi - core_lo))
    instances = np.where(geo.winner[inner] >= 0, geo.mito[inner] + 1, 0).astype(np.uint32)
    if weight is None:
        degraded = np.zeros(tuple(hi - lo), dtype=np.uint8)
    else:
        degraded = (weight[out] >= config.degraded_label_threshold).astype(np.uint8)
    return Rendered(image=image[out], classes=classes[inner], instances=instances,
                    degraded=degraded)


@dataclass
class _Geometry:
    g: np.ndarray  # float32 signed distance to the tube surface (negative inside)
    s: np.ndarray  # float32 arc length of the closest axis point on the winning polyline
    radius: np.ndarray  # float32 outer radius at that point
    winner: np.ndarray  # int32 winning segment index, -1 where no capsule was near
    mito: np.ndarray  # int32 mitochondrion index of the winner


def _axis_coords(lo, hi, az):
    """Physical coordinates of the voxels of a box, as broadcastable 1-D arrays."""
    z = (np.arange(lo[0], hi[0], dtype=np.float64) * az).astype(np.float32)[:, None, None]
    y = np.arange(lo[1], hi[1], dtype=np.float32)[None, :, None]
    x = np.arange(lo[2], hi[2], dtype=np.float32)[None, None, :]
    return z, y, x


def _boxes_hitting(boxes: np.ndarray, lo, hi) -> np.ndarray:
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    hit = np.all(boxes[:, :3] < hi, axis=1) & np.all(boxes[:, 3:] > lo, axis=1)
    return np.flatnonzero(hit)


def _capsule(seg, box, lo, hi, az):
    """Distance terms of one capsule over its box clipped to ``[lo, hi)``.

    Returns the local slices into the ``[lo, hi)`` arrays, the parameter ``t`` in [0, 1] of the
    closest axis point, and the distance to it.
    """
    blo = np.maximum(box[:3], lo)
    bhi = np.minimum(box[3:], hi)
    sl = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(blo, bhi, lo))
    z, y, x = _axis_coords(blo, bhi, az)
    p0 = seg[P0].astype(np.float32)
    dvec = (seg[P1] - seg[P0]).astype(np.float32)
    vz, vy, vx = z - p0[0], y - p0[1], x - p0[2]
    l2 = np.float32(max(float(dvec @ dvec), 1e-12))
    t = (vz * dvec[0] + vy * dvec[1] + vx * dvec[2]) / l2
    np.clip(t, 0.0, 1.0, out=t)
    cz = vz - t * dvec[0]
    cy = vy - t * dvec[1]
    cx = vx - t * dvec[2]
    dist = np.sqrt(cz * cz + cy * cy + cx * cx)
    return sl, t, dist


def _geometry(scene: Scene, lo, hi) -> _Geometry:
    shape = tuple(int(v) for v in hi - lo)
    g = np.full(shape, np.inf, dtype=np.float32)
    s = np.zeros(shape, dtype=np.float32)
    radius = np.zeros(shape, dtype=np.float32)
    winner = np.full(shape, -1, dtype=np.int32)
    for j in _boxes_hitting(scene.boxes, lo, hi):
        seg = scene.segments[j]
        sl, t, dist = _capsule(seg, scene.boxes[j], lo, hi, scene.z_anisotropy)
        r = np.float32(seg[R0]) + t * np.float32(seg[R1] - seg[R0])
        gj = dist - r
        better = gj < g[sl]
        np.copyto(g[sl], gj, where=better)
        np.copyto(s[sl], np.float32(seg[S0]) + t * np.float32(seg[LEN]), where=better)
        np.copyto(radius[sl], r, where=better)
        winner[sl][better] = j
    # winners only count where the voxel is inside the tube
    winner[g >= 0] = -1
    if len(scene.segments):
        mito = np.where(winner >= 0, scene.segments[np.maximum(winner, 0), MITO], -1)
    else:
        mito = np.full(shape, -1)
    return _Geometry(g=g, s=s, radius=radius, winner=winner, mito=mito.astype(np.int32))


def _classify(scene: Scene, geo: _Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Classes from the geometry; also the cristae mask (needed for intensities)."""
    inside = geo.winner >= 0
    if not inside.any():
        return np.zeros(geo.g.shape, dtype=np.uint8), np.zeros(geo.g.shape, dtype=bool)
    idx = np.maximum(geo.winner, 0)
    ims = np.where(inside, scene.segments[idx, IMS_COL], 0.0).astype(np.float32)
    classes = np.full(geo.g.shape, BACKGROUND, dtype=np.uint8)
    classes[inside] = IMS
    inner = inside & (geo.g < -ims)
    classes[inner] = MATRIX
    cristae = np.zeros(geo.g.shape, dtype=bool)
    if inner.any():
        poly = scene.segments[idx, POLY].astype(np.int64)
        depth_from_membrane = -(geo.g + ims)  # >= 0 inside the inner membrane
        inner_radius = geo.radius - ims
        for p in np.unique(poly[inner]):
            table = scene.cristae[p]
            if len(table) == 0:
                continue
            where = np.flatnonzero((inner & (poly == p)).ravel())
            sv = geo.s.ravel()[where].astype(np.float64)
            k = np.searchsorted(table[:, 0], sv)
            hit = np.zeros(len(where), dtype=bool)
            for cand in (k - 1, k):
                ok = (cand >= 0) & (cand < len(table))
                c = table[np.clip(cand, 0, len(table) - 1)]
                reach = c[:, 2] * inner_radius.ravel()[where]
                hit |= ok & (np.abs(sv - c[:, 0]) < c[:, 1]) & (
                    depth_from_membrane.ravel()[where] < reach)
            cristae.ravel()[where[hit]] = True
        classes[cristae] = CRISTAE
    # z voxels are coarser than the thinnest IMS: where the sampled IMS vanished between an inner
    # voxel and background (tube tops and bottoms), the inner voxel becomes IMS. One voxel of
    # reach, inside the halo, so it does not depend on the box.
    touching = ndimage.binary_dilation(classes == BACKGROUND, structure=_FACES) & inner
    classes[touching] = IMS
    cristae &= ~touching
    return classes, cristae


def _clean_intensity(config, classes, cristae, geo, lo, hi) -> np.ndarray:
    """Noise-free stain density before blur: textured cytosol, membrane, dark IMS, bright matrix."""
    texture = _cell_field(config, TEXTURE, lo, hi, "uniform") - np.float32(0.5)
    z, y, x = _axis_coords(lo, hi, config.z_anisotropy)
    slow = np.float32(0.04) * (np.sin(y / np.float32(97.0)) + np.cos(x / np.float32(131.0) + z / np.float32(53.0)))
    clean = np.float32(BG_LEVEL) + np.float32(BG_TEXTURE) * texture + slow
    membrane = (classes == IMS) & (geo.g >= -1.0)
    clean[classes == IMS] = IMS_LEVEL
    clean[membrane] = MEMBRANE
    matrix = classes == MATRIX
    clean[matrix] = MATRIX_LEVEL + MATRIX_TEXTURE * texture[matrix]
    clean[cristae] = CRISTAE_LEVEL
    return clean.astype(np.float32)


def _degradation_weight(scene: Scene, lo, hi):
    """Blend weight toward background: strength x smoothstep of the distance to the area's axis."""
    hits = _boxes_hitting(scene.degraded_boxes, lo, hi)
    if len(hits) == 0:
        return None
    weight = np.zeros(tuple(int(v) for v in hi - lo), dtype=np.float32)
    for j in hits:
        seg = scene.degraded[j]
        sl, _, dist = _capsule(seg, scene.degraded_boxes[j], lo, hi, scene.z_anisotropy)
        reach = np.float32(seg[R0])
        u = np.clip((reach - dist) / (np.float32(0.5) * reach), 0.0, 1.0)
        w = np.float32(seg[IMS_COL]) * u * u * (np.float32(3.0) - np.float32(2.0) * u)
        np.maximum(weight[sl], w, out=weight[sl])
    return weight


def _detector(config, signal, lo, hi) -> np.ndarray:
    """Poisson photon counts plus Gaussian read noise, as uint16 ADU."""
    photons = config.photons / config.noise**2
    lam = np.clip(signal, 0.0, None).astype(np.float64) * photons
    counts = _cell_poisson(config, lam, lo, hi)
    read = _cell_field(config, READ_NOISE, lo, hi, "normal")
    adu = GAIN_ADU * counts + config.offset_adu + (config.read_noise * config.noise) * read
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _generator(config: SynthConfig, stream: int, z: int, cy: int, cx: int) -> np.random.Generator:
    """A generator for one cell: the cell's index picks a 2**64-long block of Philox's counter."""
    key = (config.seed << 8) | stream
    cell = ((z + 2**15) << 42) | ((cy + 2**20) << 21) | (cx + 2**20)
    return np.random.Generator(np.random.Philox(key=key, counter=[0, cell, 0, 0]))


def _cells(lo, hi):
    """Cells covering ``[lo, hi)``: yields (z, cy, cx) and the cell's voxel box."""
    for z in range(int(lo[0]), int(hi[0])):
        for cy in range(int(lo[1]) // CELL, -(-int(hi[1]) // CELL)):
            for cx in range(int(lo[2]) // CELL, -(-int(hi[2]) // CELL)):
                yield z, cy, cx


def _cell_field(config, stream, lo, hi, kind) -> np.ndarray:
    """Per-voxel random field over ``[lo, hi)`` that does not depend on the box."""
    out = np.empty(tuple(int(v) for v in hi - lo), dtype=np.float32)
    for z, cy, cx in _cells(lo, hi):
        gen = _generator(config, stream, z, cy, cx)
        cell = (gen.random((CELL, CELL), dtype=np.float32) if kind == "uniform"
                else gen.standard_normal((CELL, CELL), dtype=np.float32))
        _paste(out, cell, lo, hi, z, cy, cx)
    return out


def _paste(out, cell, lo, hi, z, cy, cx):
    y0, x0 = cy * CELL, cx * CELL
    ya, yb = max(y0, lo[1]), min(y0 + CELL, hi[1])
    xa, xb = max(x0, lo[2]), min(x0 + CELL, hi[2])
    out[z - lo[0], ya - lo[1]:yb - lo[1], xa - lo[2]:xb - lo[2]] = (
        cell[ya - y0:yb - y0, xa - x0:xb - x0])


def _cell_poisson(config, lam, lo, hi) -> np.ndarray:
    """Poisson draws per whole cell; ``[lo, hi)`` must be cell-aligned in y and x."""
    out = np.empty(lam.shape, dtype=np.float32)
    for z, cy, cx in _cells(lo, hi):
        gen = _generator(config, PHOTONS, z, cy, cx)
        y0, x0 = cy * CELL - lo[1], cx * CELL - lo[2]
        sl = (z - lo[0], slice(y0, y0 + CELL), slice(x0, x0 + CELL))
        out[sl] = gen.poisson(lam[sl])
    return out
