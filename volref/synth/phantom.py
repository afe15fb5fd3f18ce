"""A phantom as lazy Dask arrays: one render task per block of whole chunks, four arrays out of it.

Nothing is computed here; the caller stores or computes the arrays. Each block is rendered once
even though four arrays come out of it: the render task returns all four stacked, and the four
arrays are slices of that stack, so storing them in one ``dask.compute``/``da.store`` call runs
each render exactly once. A block is a whole number of the config's chunks, grown to about
:data:`RENDER_VOXELS` voxels: rendering has a fixed cost per box (the scene's nearby tubes, whole
64x64 noise cells), so tiny chunks (``--chunks 1 1 1``) would otherwise cost minutes for a few
thousand voxels. The voxels do not depend on the boxes, so the bytes are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from volref.synth.config import SynthConfig
from volref.synth.render import render_box
from volref.synth.scene import Scene, build_scene


@dataclass(frozen=True)
class Phantom:
    """Lazy arrays of one phantom, all ``(z, y, x)`` with the config's chunks.

    Attributes
    ----------
    image
        uint16 detector counts.
    classes
        uint8 ground-truth classes: 0 background, 1 IMS, 2 cristae, 3 matrix.
    instances
        uint32 ground-truth mitochondrion ids ``1..scene.n_mitochondria``.
    degraded
        uint8, 1 where the stain was weakened (low-SNR areas).
    """

    config: SynthConfig
    scene: Scene
    image: da.Array
    classes: da.Array
    instances: da.Array
    degraded: da.Array


RENDER_VOXELS = 2**20


def render_block(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The render box: ``chunks`` doubled per axis (x, then y, then z) while it holds fewer than
    :data:`RENDER_VOXELS` voxels and is smaller than the volume along that axis."""
    block = [min(c, s) for c, s in zip(chunks, shape)]
    grown = True
    while grown and int(np.prod(block)) < RENDER_VOXELS:
        grown = False
        for ax in (2, 1, 0):
            if block[ax] < shape[ax] and int(np.prod(block)) < RENDER_VOXELS:
                block[ax] = min(2 * block[ax], -(-shape[ax] // chunks[ax]) * chunks[ax])
                grown = True
    return tuple(block)


def make_phantom(config: SynthConfig) -> Phantom:
    """Build the scene (eager, small) and the lazy voxel arrays of a phantom (dask chunks are
    whole multiples of ``config.chunks``; storing rechunks to the zarr chunks)."""
    scene = build_scene(config)
    chunks = da.core.normalize_chunks(render_block(config.chunks, config.shape), config.shape)
    stack = da.map_blocks(
        _render_stack,
        dtype=np.uint32,
        chunks=((4,),) + chunks,
        meta=np.empty((0, 0, 0, 0), dtype=np.uint32),
        scene=scene,
        config=config,
    )
    return Phantom(
        config=config,
        scene=scene,
        image=stack[0].astype(np.uint16),
        classes=stack[1].astype(np.uint8),
        instances=stack[2],
        degraded=stack[3].astype(np.uint8),
    )


def _render_stack(scene: Scene, config: SynthConfig, block_info=None) -> np.ndarray:
    (_, _), *loc = block_info[None]["array-location"]
    lo = [a for a, _ in loc]
    hi = [b for _, b in loc]
    r = render_box(scene, config, lo, hi)
    return np.stack([r.image.astype(np.uint32), r.classes, r.instances, r.degraded])
