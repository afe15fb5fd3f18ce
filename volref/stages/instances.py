"""Connected mitochondria across blocks: label each block alone, join labels that touch across
block faces, give every mitochondrion one id.

The scheme (as large-volume engines do it), never holding the whole volume or a dense id table::

    1. per block   label the mitochondrion mask (6-connected) -> local ids 1..n
                   stateless 64-bit id = block number x block voxels + local id
                   key of each local id = global raster index of its first voxel
    2. per face    the one-voxel planes on both sides of a block face -> pairs of ids that touch
    3. once        union-find over the pairs (only ids that touch a face enter it); each
                   mitochondrion's key = the smallest key of its parts; ids 1..N in key order
    4. per block   relabel with the block's own small table (local id -> final id)

Components smaller than ``min_voxels`` in total (specks of a few voxels that a segmentation
leaves near membranes) are not mitochondria and get id 0; their sizes merge across blocks like
their ids, so a large mitochondrion cut into small pieces by blocks is kept.

Keys are positions in the volume, not block numbers, so the final ids are the same for any block
shape: mitochondrion 1 is the one whose first voxel comes first in z, y, x raster order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from volref.classes import mitochondria

#: face connectivity: exact with one-voxel faces between blocks (no edge/corner neighbours)
STRUCTURE = ndimage.generate_binary_structure(3, 1)


@dataclass
class BlockLabels:
    """What step 1 returns for a block (small: no voxel data except its six faces)."""

    n: int
    keys: np.ndarray  # (n,) uint64 global raster index of each local id's first voxel
    sizes: np.ndarray  # (n,) int64 voxels of each local id
    faces: dict[tuple[int, int], np.ndarray]  # (axis, 0=low | 1=high) -> local ids on that plane


def label_block(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components of a boolean block: uint32 local ids and their count."""
    labels, n = ndimage.label(mask, structure=STRUCTURE, output=np.uint32)
    return labels, int(n)


def first_voxel_keys(labels: np.ndarray, n: int, start: Sequence[int],
                     volume: Sequence[int]) -> np.ndarray:
    """Global raster index (z, y, x of the whole volume) of each label's first voxel.

    Within a block, raster order of the block agrees with raster order of the volume, so the
    first occurrence in the block is the label's first voxel there.
    """
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids > 0
    ids, first = ids[keep], first[keep]
    local = np.unravel_index(first, labels.shape)
    glob = [loc.astype(np.uint64) + np.uint64(s) for loc, s in zip(local, start)]
    _, ny, nx = (np.uint64(v) for v in volume)
    keys = np.empty(n, dtype=np.uint64)
    keys[ids.astype(np.int64) - 1] = (glob[0] * ny + glob[1]) * nx + glob[2]
    return keys


def block_labels(mask: np.ndarray, start: Sequence[int], volume: Sequence[int]) -> BlockLabels:
    labels, n = label_block(mask)
    faces = {}
    for axis in range(3):
        for side, index in ((0, 0), (1, labels.shape[axis] - 1)):
            faces[(axis, side)] = np.take(labels, index, axis=axis).copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    return BlockLabels(n, first_voxel_keys(labels, n, start, volume), sizes, faces)


def face_pairs(low_face: np.ndarray, high_face: np.ndarray) -> np.ndarray:
    """Unique ``(id in low block, id in high block)`` pairs that touch across a face, (k, 2)."""
    both = (low_face > 0) & (high_face > 0)
    if not both.any():
        return np.zeros((0, 2), dtype=np.uint32)
    pairs = np.stack([low_face[both], high_face[both]], axis=1)
    return np.unique(pairs, axis=0)


class UnionFind:
    """Union-find over sparse 64-bit ids (a dict: only ids that touch a face are stored)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while a != root:  # path compression
            nxt = self.parent.get(a, a)
            self.parent[a] = root
            a = nxt
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo


def resolve(blocks: Sequence[tuple[int, np.ndarray, np.ndarray]], bases: Sequence[int],
            edges: Iterable[tuple[int, int, np.ndarray]],
            min_voxels: int = 0) -> tuple[list[np.ndarray], int]:
    """Final ids for every block's local ids.

    Parameters
    ----------
    blocks
        ``(n, keys, sizes)`` per block (step 1), in block order.
    bases
        Stateless id base of each block (block number x block voxels).
    edges
        ``(block a, block b, pairs)``: local ids of ``a`` and ``b`` that touch.
    min_voxels
        Components with fewer voxels in total (specks, not mitochondria) get id 0.

    Returns
    -------
    One uint32 table per block (``table[local] = final``, ``table[0] = 0``) and N.
    """
    uf = UnionFind()
    for a, b, pairs in edges:
        for la, lb in pairs.tolist():
            uf.union(bases[a] + la, bases[b] + lb)
    # each mitochondrion's key: the smallest first-voxel key of its parts
    best: dict[int, int] = {}
    size: dict[int, int] = {}
    roots_per_block = []
    for (n, keys, sizes), base in zip(blocks, bases):
        roots = np.array([uf.find(base + i) for i in range(1, n + 1)], dtype=np.uint64)
        roots_per_block.append(roots)
        for r, k, v in zip(roots.tolist(), keys.tolist(), sizes.tolist()):
            if k < best.get(r, 2**64):
                best[r] = k
            size[r] = size.get(r, 0) + v
    order = sorted((r for r in best if size[r] >= min_voxels), key=best.__getitem__)
    final = {r: i + 1 for i, r in enumerate(order)}
    if len(final) >= 2**32:
        raise ValueError(f"{mitochondria(len(final))} do not fit uint32 ids")
    tables = []
    for roots in roots_per_block:
        table = np.zeros(len(roots) + 1, dtype=np.uint32)
        table[1:] = [final.get(r, 0) for r in roots.tolist()]
        tables.append(table)
    return tables, len(final)
