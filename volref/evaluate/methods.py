"""Every refinement method applied to one tile of a whole z-slice, as ``volref refine --method``
would see it: the tile plus the context the method reaches into.

* ``mae`` / ``mae-x`` / ``cnn-ae``: the tile refiners of :mod:`volref.stages.refine`, run over the
  global tile grid of a window (the tile plus :func:`~volref.stages.refine.context` pixels on
  every side, background and zero uncertainty past the slice), scored on the tile.
* ``fused``: the MAE run as ``mae``, the class of each pixel it rebuilds chosen from its and the
  ensemble's probabilities (:mod:`volref.models.fusion`).
* ``crf``: the dense CRF of :mod:`volref.stages.crf` on the ensemble's probabilities and the
  image of the tile plus ``crf_margin`` pixels, when the tile holds a removed patch (as
  :func:`~volref.stages.crf.crf_region` does for a volume), scored on the tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from volref.classes import BACKGROUND
from volref.io.region import read_padded
from volref.models.fusion import Fusion
from volref.stages.crf import CRFSettings, crf_region
from volref.stages.refine import context, refine_region
from volref.stages.settings import RefineSettings


@dataclass(frozen=True)
class MethodSettings:
    refine: RefineSettings = field(default_factory=RefineSettings)
    crf: CRFSettings = field(default_factory=CRFSettings)
    crf_margin: int = 32
    fusion: Fusion | None = None  # fused: how the MAE's and the ensemble's probabilities combine


def window(a: np.ndarray, y0: int, x0: int, y1: int, x1: int, fill) -> np.ndarray:
    """``a[..., y0:y1, x0:x1]`` with ``fill`` where the window leaves ``a`` (``fill="mirror"``:
    mirrored there, as ``volref refine`` reads images)."""
    lead = (slice(None),) * (a.ndim - 2)
    if isinstance(fill, str):
        return read_padded(a, (y0, x0), (y1, x1), "mirror", lead=lead)
    return read_padded(a, (y0, x0), (y1, x1), "constant", lead=lead, fill=fill)


def refine_tile(method: str, models: Mapping[str, nn.Module], *, initial: np.ndarray,
                uncertainty: np.ndarray, image: np.ndarray, probabilities, y: int, x: int,
                tile: int, settings: MethodSettings = MethodSettings()) -> np.ndarray:
    """The ``tile x tile`` labels at ``(y, x)`` of a slice after ``method``.

    ``initial``, ``uncertainty``, ``image``: the whole slice ``(Y, X)``; ``probabilities``: a
    callable returning the slice's ensemble probabilities ``(C, Y, X)`` (``crf`` and ``fused``
    call it).
    """
    if method == "initial":
        return initial[y:y + tile, x:x + tile].copy()
    if method == "crf":  # as volref refine --method crf: the tile's window, past the slice
        m = settings.crf_margin  # mirrored (image, probabilities) or empty (labels)
        box = (y - m, x - m, y + tile + m, x + tile + m)
        rs = settings.refine
        return crf_region(window(probabilities(), *box, "mirror")[None],
                          window(image, *box, "mirror")[None],
                          window(initial, *box, BACKGROUND)[None],
                          window(uncertainty, *box, np.float32(0.0))[None], tile=tile,
                          margin=m, tau=rs.tau, near_px=rs.near_px, settings=settings.crf)[0]
    if method not in models:
        raise KeyError(f"no model for method {method!r}")
    model: Any = models[method]  # a tile refiner (MAE, MAE+X, CNN-AE)
    rs = settings.refine
    c = context(rs, model.config.patch)
    box = (y - c, x - c, y + tile + c, x + tile + c)
    lab = window(initial, *box, BACKGROUND)[None]
    unc = window(uncertainty, *box, np.float32(0.0))[None]
    img = None
    if getattr(model, "needs_image", False):  # mirrored past the slice, as volref refine reads
        img = window(image, *box, "mirror")[None]
    combine = None
    if method == "fused":
        if settings.fusion is None:
            raise KeyError("no fusion for method 'fused' (MethodSettings.fusion)")
        fusion = settings.fusion
        ens = window(probabilities(), y, x, y + tile, x + tile, "mirror")

        def combine(z: int, sel: np.ndarray, p: np.ndarray) -> np.ndarray:
            return fusion.classes(ens[:, sel], p)

    return refine_region(model, lab, unc, rs, image=img, combine=combine).labels[0]
