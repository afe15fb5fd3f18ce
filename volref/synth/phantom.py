"""A phantom as lazy Dask arrays: one render task per chunk, four arrays out of it.

Nothing is computed here; the caller stores or computes the arrays. Each chunk is rendered once
even though four arrays come out of it: the render task returns all four stacked, and the four
arrays are slices of that stack, so storing them in one ``dask.compute``/``da.store`` call runs
each render exactly once.
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


def make_phantom(config: SynthConfig) -> Phantom:
    """Build the scene (eager, small) and the lazy voxel arrays of a phantom."""
    scene = build_scene(config)
    chunks = da.core.normalize_chunks(config.chunks, config.shape)
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
