"""The 3-D length of a mitochondrion from a graph of its skeleton.

1. The skeleton: Lee thinning of the mask (scikit-image), as before.
2. The graph: one node per skeleton voxel, an edge between 26-neighbours weighted by their
   physical distance (``spacing`` per axis).
3. The length: the total weight of the graph's minimum spanning tree, plus, at each end point
   of the tree, the distance from that voxel to the background (thinning stops about one radius
   short of a tube's end).

Why not the sum over every neighbour pair (volref until 0.1): where the skeleton is more than
one voxel thick — junctions, and blob-like pieces of a thick mitochondrion — every voxel has
many neighbours and each pair was counted, so a 521 µm skeleton measured 2,442 µm. The tree
keeps each voxel joined once, by its shortest links. skan (``skan.Skeleton``) replaces only
clusters of junction voxels by their spanning tree and keeps real loops; a tree counts a loop
one link short — one voxel, not a length that matters here. The tests compare both with the
true length of straight and curved tubes and with skan on the phantoms' mitochondria.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import minimum_spanning_tree
from skimage.morphology import skeletonize

#: voxels between the points a branch is measured through. A digital line's steps (1, √2, √3
#: voxels) overstate an oblique tube: +5 % in a plane, +11 % in 3-D, +22 % with z voxels 2.5x
#: coarser (skan, which measures step by step, shows the same). Chords over 2 voxels: within
#: 3.4 % on tubes with cubic voxels, +8 % with 2.5x z, 3-8 % below skan on the phantoms;
#: over 4-6 voxels: within 3.3 % on every tube but 5-16 % below skan on the phantoms (whose
#: z voxels are 2.5x coarser). 2 keeps volref's length comparable with skan's.
STEP = 2

# 13 of the 26 neighbour offsets: each neighbour pair once
_OFFSETS = np.array([(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                     if (dz, dy, dx) > (0, 0, 0)])


def skeleton_graph(skel: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)):
    """Nodes (voxel coordinates, ``(n, 3)``) and the edge matrix (``n x n``,
    each 26-neighbour pair once, weight = physical distance) of a 3-D skeleton."""
    coords = np.argwhere(skel)
    n = len(coords)
    lookup = np.full(skel.shape, -1, dtype=np.int64)
    lookup[tuple(coords.T)] = np.arange(n)
    rows, cols, weights = [], [], []
    shape = np.array(skel.shape)
    for off in _OFFSETS:
        other = coords + off
        inside = np.all((other >= 0) & (other < shape), axis=1)
        j = np.full(n, -1, dtype=np.int64)
        j[inside] = lookup[tuple(other[inside].T)]
        hit = j >= 0
        rows.append(np.flatnonzero(hit))
        cols.append(j[hit])
        weights.append(np.full(int(hit.sum()), float(np.linalg.norm(off * np.asarray(spacing)))))
    r, c, w = (np.concatenate(x) if x else np.zeros(0) for x in (rows, cols, weights))
    return coords, coo_matrix((w, (r.astype(np.int64), c.astype(np.int64))), shape=(n, n)).tocsr()


def skeleton_length(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    step: int = STEP) -> float:
    """Length of the 3-D skeleton of ``mask (z, y, x)`` in the units of ``spacing``: the
    branches of the skeleton graph's minimum spanning tree, each measured along every
    ``step``-th voxel (see the module doc)."""
    if not mask.any():
        return 0.0
    skel = skeletonize(np.pad(mask.astype(bool), 1), method="lee").astype(bool)
    if not skel.any():
        return 0.0
    coords, graph = skeleton_graph(skel, spacing)
    tree = minimum_spanning_tree(graph)
    points = coords * np.asarray(spacing, dtype=float)
    total = 0.0
    for branch in branches(tree + tree.T):
        total += polyline_length(points[branch], step)
    return total


def polyline_length(points: np.ndarray, step: int) -> float:
    """Length of the polyline through every ``step``-th point (and the last)."""
    if len(points) < 2:
        return 0.0
    keep = np.unique(np.append(np.arange(0, len(points), step), len(points) - 1))
    return float(np.linalg.norm(np.diff(points[keep], axis=0), axis=1).sum())


def branches(tree) -> list[np.ndarray]:
    """Node paths between the tree's end points and junctions (nodes of degree other than 2);
    ``tree``: a symmetric sparse adjacency matrix. Every edge lies on exactly one path."""
    tree = tree.tocsr()
    indptr, indices = tree.indptr, tree.indices
    degree = np.diff(indptr)
    seen: set[tuple[int, int]] = set()
    paths = []
    for start in map(int, np.flatnonzero(degree != 2)):
        for nxt in indices[indptr[start]:indptr[start + 1]]:
            if (start, int(nxt)) in seen:
                continue
            path: list[int] = [start]
            prev, cur = start, int(nxt)
            seen.add((start, cur))
            while True:
                path.append(cur)
                if degree[cur] != 2:
                    seen.add((cur, prev))
                    break
                a, b = indices[indptr[cur]:indptr[cur + 1]]
                prev, cur = cur, int(b if a == prev else a)
            paths.append(np.asarray(path))
    return paths
