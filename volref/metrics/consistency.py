"""The paper's biological-consistency metrics (METHOD.md), for a 2-D slice and aggregated over
the z-slices of one mitochondrion.

Classes: 0 background, 1 IMS, 2 cristae, 3 matrix. The *mitochondrion* is every non-background
pixel; its *inner structure* is cristae + matrix.

Boundary lengths count pixel edges: the number of 4-neighbour pairs whose pixels belong to the
two sides (a digital outline's length in pixel sides). With ``pad=True`` the slice is surrounded
by background first, so an object touching the array's edge is closed there.

=============================  ===============================================================
metric                         definition
=============================  ===============================================================
skeleton_end_points            end points (one 8-neighbour) of the inner structure's skeleton
                               (Lee thinning, scikit-image)
skeleton_cycles                holes of that skeleton (independent cycles)
boundary_area_ratio  %         100 x mitochondrion/background edges / mitochondrion area
cristae_boundary_ratio  %      100 x cristae/IMS edges / inner-structure/IMS edges (high when
                               cristae detach from the inner membrane into the IMS)
inner_membrane_background %    100 x inner-structure/background edges / mitochondrion/
                               background edges (high when the IMS is missing)
=============================  ===============================================================

Ratios with an empty denominator are NaN (nothing to measure), not 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from volref.metrics.skeleton import skeleton_length  # noqa: F401 - the 3-D length, from a graph

BACKGROUND, IMS, CRISTAE, MATRIX = 0, 1, 2, 3
METRICS = ("skeleton_end_points", "skeleton_cycles", "boundary_area_ratio",
           "cristae_boundary_ratio", "inner_membrane_background_ratio")
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SliceCounts:
    """Additive counts of one slice; sums over slices give a mitochondrion's metrics."""

    present: int = 0  # 1 when the slice holds any mitochondrion pixel
    end_points: int = 0
    cycles: int = 0
    area: int = 0
    outline: int = 0  # mitochondrion / background edges
    cristae_ims: int = 0
    inner_ims: int = 0
    inner_background: int = 0

    def __add__(self, other: SliceCounts) -> SliceCounts:
        return SliceCounts(*(getattr(self, f.name) + getattr(other, f.name)
                             for f in fields(self)))

    def metrics(self) -> dict[str, float]:
        """The five metrics; end points and cycles are means per slice holding the object."""
        per = max(self.present, 1)
        return {
            "skeleton_end_points": self.end_points / per,
            "skeleton_cycles": self.cycles / per,
            "boundary_area_ratio": _ratio(self.outline, self.area),
            "cristae_boundary_ratio": _ratio(self.cristae_ims, self.inner_ims),
            "inner_membrane_background_ratio": _ratio(self.inner_background, self.outline),
        }

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _ratio(num: int, den: int) -> float:
    return 100.0 * num / den if den else float("nan")


def edges(a: np.ndarray, b: np.ndarray) -> int:
    """Number of 4-neighbour pixel pairs with one pixel in ``a`` and the other in ``b``."""
    n = 0
    for axis in range(a.ndim):
        low = [slice(None)] * a.ndim
        high = [slice(None)] * a.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(low), tuple(high)
        n += int(np.count_nonzero(a[lo] & b[hi]) + np.count_nonzero(b[lo] & a[hi]))
    return n


def skeleton_topology(mask: np.ndarray) -> tuple[int, int]:
    """End points and cycles of the 2-D skeleton (Lee thinning) of ``mask``."""
    if not mask.any():
        return 0, 0
    skel = skeletonize(np.pad(mask, 1), method="lee").astype(bool)
    neighbours = ndimage.convolve(skel.astype(np.uint8), _EIGHT.astype(np.uint8),
                                  mode="constant") - 1
    end_points = int(np.count_nonzero(skel & (neighbours == 1)))
    # holes of an 8-connected curve: 4-connected pieces of its complement, minus the outside
    _, pieces = ndimage.label(~skel, structure=_FOUR)
    return end_points, int(pieces) - 1


def slice_counts(labels: np.ndarray, pad: bool = True) -> SliceCounts:
    """Counts of one 2-D class slice."""
    if pad:
        labels = np.pad(labels, 1, constant_values=BACKGROUND)
    mito = labels != BACKGROUND
    if not mito.any():
        return SliceCounts()
    bg = ~mito
    ims = labels == IMS
    cristae = labels == CRISTAE
    inner = cristae | (labels == MATRIX)
    end_points, cycles = skeleton_topology(inner)
    return SliceCounts(present=1, end_points=end_points, cycles=cycles,
                       area=int(np.count_nonzero(mito)), outline=edges(mito, bg),
                       cristae_ims=edges(cristae, ims), inner_ims=edges(inner, ims),
                       inner_background=edges(inner, bg))


def tile_metrics(labels: np.ndarray, pad: bool = False) -> dict[str, float]:
    """The five metrics of a 2-D tile (the paper's per-tile numbers)."""
    return slice_counts(labels, pad=pad).metrics()
