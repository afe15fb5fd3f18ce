"""Reading a box that may reach past the array: the one "read past the volume" of volref.

The engine's block tasks, the evaluation's tile windows and the Table 2 slices all read through
:func:`read_padded`, so a voxel outside the volume reads the same value wherever it is asked
for — the bit-identity of results across block shapes depends on it::

      requested   [y0 - h ........................ y1 + h)
      volume      [0 ............... n)
      "mirror"                          n-1 n-2 ...           (images: as np.pad "symmetric")
      "constant"                        c   c   ...           (labels: background, c = fill)

Only the part of the box inside the array is read (one slice of a zarr array or a numpy array),
so the padding costs no extra I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: padding modes of :func:`read_padded`
MODES = ("mirror", "constant")

Index = int | slice


def reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into ``[0, n)`` like ``np.pad(mode="symmetric")``, for any distance."""
    m = np.mod(index, 2 * n)
    out: np.ndarray = np.where(m >= n, 2 * n - 1 - m, m)
    return out


def read_padded(array: Any, start: Sequence[int], stop: Sequence[int], mode: str = "constant",
                *, lead: tuple[Index, ...] = (), fill: Any = 0) -> np.ndarray:
    """``array[lead + [start, stop)]`` where the box ``[start, stop)`` may leave the array.

    Parameters
    ----------
    array
        A numpy or zarr array (anything sliceable with a ``shape`` and ``dtype``).
    start, stop
        The box on the array's last ``len(start)`` axes; may be negative or past the end.
    mode
        ``"mirror"``: outside voxels mirror the inside ones (``np.pad`` "symmetric", for any
        distance); ``"constant"``: they are ``fill``.
    lead
        Index of the leading axes (ints drop an axis, slices keep it): ``array.ndim - len(start)``
        entries.
    fill
        The constant of ``mode="constant"`` (cast to the array's dtype).

    Returns
    -------
    numpy.ndarray
        The leading axes that ``lead`` keeps, then ``stop - start``; the array's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    nbox = len(start)
    if len(stop) != nbox or len(lead) + nbox != len(array.shape):
        raise ValueError(f"box of {nbox} axes and {len(lead)} leading indices do not fit an "
                         f"array of shape {tuple(array.shape)}")
    shape = tuple(array.shape[-nbox:])
    if mode == "mirror":
        idx = [reflect(np.arange(a, b), n) for a, b, n in zip(start, stop, shape)]
        lo = [int(i.min()) if i.size else 0 for i in idx]
        hi = [int(i.max()) + 1 if i.size else 0 for i in idx]
        data = np.asarray(array[lead + tuple(slice(a, b) for a, b in zip(lo, hi))])
        box = np.ix_(*(i - a for i, a in zip(idx, lo)))
        return data[(Ellipsis,) + box]
    kept = tuple(len(range(*s.indices(n))) for s, n in zip(lead, array.shape) if isinstance(s, slice))
    out = np.full(kept + tuple(b - a for a, b in zip(start, stop)), fill, dtype=array.dtype)
    inside = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(start, stop, shape))
    if all(s.stop > s.start for s in inside):
        data = np.asarray(array[lead + inside])
        out[(Ellipsis,) + tuple(slice(s.start - a, s.stop - a) for s, a in zip(inside, start))] \
            = data
    return out
