"""Every refinement method (:mod:`volref.methods`) applied to one tile of a whole z-slice, or to
the whole slice, as ``volref refine --method`` would see it: the tile plus the context the method
reaches into.

* ``mae`` / ``mae-x`` / ``cnn-ae``: the tile refiners of :mod:`volref.stages.refine`, run over the
  global tile grid of a window (the tile plus :func:`~volref.stages.refine.context` pixels on
  every side, background and zero uncertainty past the slice), scored on the tile.
* ``fused``: the MAE run as ``mae``, the class of each pixel it rebuilds chosen from its and the
  ensemble's probabilities (smoothed on the ensemble's tile grid of the slice, as the refine
  stage smooths them) and the rim rule (:mod:`volref.models.fusion`).
* ``crf``: the dense CRF of :mod:`volref.stages.crf` on the ensemble's probabilities and the
  image of the tile plus ``crf_margin`` pixels, when the tile holds a removed patch (as
  :func:`~volref.stages.crf.crf_region` does for a volume), scored on the tile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from volref.classes import BACKGROUND
from volref.io.region import read_padded
from volref.methods import REGISTRY, Method
from volref.models.fusion import Fusion, smooth_tiles
from volref.stages.crf import CRFSettings, crf_region
from volref.stages.refine import Combine, context, refine_region
from volref.stages.settings import RefineSettings, SegmentSettings


@dataclass(frozen=True)
class MethodSettings:
    refine: RefineSettings = field(default_factory=RefineSettings)
    crf: CRFSettings = field(default_factory=CRFSettings)
    crf_margin: int = 32
    fusion: Fusion | None = None  # fused: how the MAE's and the ensemble's probabilities combine
    ensemble_tile: int = SegmentSettings().tile  # fused: the grid its smoothing keeps to


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
    callable returning the slice's ensemble probabilities ``(C, Y, X)`` (only methods that need
    them call it: ``crf``, ``fused``).
    """
    return refine_window(method, models, initial=initial, uncertainty=uncertainty, image=image,
                         probabilities=probabilities, box=(y, x, y + tile, x + tile),
                         tile=tile, settings=settings)


def refine_slice(method: str, models: Mapping[str, nn.Module], *, initial: np.ndarray,
                 uncertainty: np.ndarray, image: np.ndarray, probabilities, tile: int,
                 settings: MethodSettings = MethodSettings()) -> np.ndarray:
    """The whole slice's labels after ``method`` (arguments as :func:`refine_tile`; ``tile``:
    the tiles a method that relabels whole tiles works in, as :func:`refine_tile`'s)."""
    ny, nx = initial.shape
    return refine_window(method, models, initial=initial, uncertainty=uncertainty, image=image,
                         probabilities=probabilities, box=(0, 0, ny, nx), tile=tile,
                         settings=settings)


def refine_window(method: str, models: Mapping[str, nn.Module], *, initial: np.ndarray,
                  uncertainty: np.ndarray, image: np.ndarray, probabilities,
                  box: tuple[int, int, int, int], tile: int,
                  settings: MethodSettings = MethodSettings()) -> np.ndarray:
    """The labels of ``box = (y0, x0, y1, x1)`` of a slice (``y0``, ``x0`` on the tile grid)
    after ``method``: its registry entry's tile function (:data:`TILES`) on the box plus the
    context the method reaches into (``tile``: the CRF's tiles)."""
    y0, x0, y1, x1 = box
    if method == "initial":
        return initial[y0:y1, x0:x1].copy()
    spec = REGISTRY[method]
    return TILES[spec.block](spec, models, initial, uncertainty, image, probabilities, box,
                             tile, settings)


def _crf_window(spec: Method, models: Mapping[str, nn.Module], initial: np.ndarray,
                uncertainty: np.ndarray, image: np.ndarray, probabilities,
                box: tuple[int, int, int, int], tile: int,
                settings: MethodSettings) -> np.ndarray:
    """As volref refine --method crf: the box's window, past the slice mirrored (image,
    probabilities) or empty (labels)."""
    m = settings.crf_margin
    y0, x0, y1, x1 = box
    win = (y0 - m, x0 - m, y1 + m, x1 + m)
    rs = settings.refine
    return crf_region(window(probabilities(), *win, "mirror")[None],
                      window(image, *win, "mirror")[None],
                      window(initial, *win, BACKGROUND)[None],
                      window(uncertainty, *win, np.float32(0.0))[None], tile=tile,
                      margin=m, tau=rs.tau, near_px=rs.near_px, settings=settings.crf)[0]


def _tiles_window(spec: Method, models: Mapping[str, nn.Module], initial: np.ndarray,
                  uncertainty: np.ndarray, image: np.ndarray, probabilities,
                  box: tuple[int, int, int, int], tile: int, settings: MethodSettings,
                  combine: Combine | None = None, rim_rule: bool = False) -> np.ndarray:
    """A tile refiner (MAE, MAE+X, CNN-AE) over the global tile grid of the box's window
    (``combine``, ``rim_rule``: as :func:`~volref.stages.refine.refine_region`'s)."""
    if spec.name not in models:
        raise KeyError(f"no model for method {spec.name!r}")
    model: Any = models[spec.name]
    rs = settings.refine
    c = context(rs, model.config.patch)
    y0, x0, y1, x1 = box
    win = (y0 - c, x0 - c, y1 + c, x1 + c)
    lab = window(initial, *win, BACKGROUND)[None]
    unc = window(uncertainty, *win, np.float32(0.0))[None]
    img = None
    if getattr(model, "needs_image", False):  # mirrored past the slice, as volref refine reads
        img = window(image, *win, "mirror")[None]
    return refine_region(model, lab, unc, rs, image=img, combine=combine,
                         rim_rule=rim_rule).labels[0]


def _fused_window(spec: Method, models: Mapping[str, nn.Module], initial: np.ndarray,
                  uncertainty: np.ndarray, image: np.ndarray, probabilities,
                  box: tuple[int, int, int, int], tile: int,
                  settings: MethodSettings) -> np.ndarray:
    """The MAE as :func:`_tiles_window`, each pixel it rebuilds given its class from its and the
    ensemble's probabilities (``settings.fusion``)."""
    if settings.fusion is None:
        raise KeyError(f"no fusion for method {spec.name!r} (MethodSettings.fusion)")
    fusion = settings.fusion
    whole = probabilities()
    ens = window(whole, *box, "mirror")
    smooth = None
    if fusion.smooth > 0:
        t = settings.ensemble_tile
        y0, x0, y1, x1 = box
        needed = np.zeros((-(-whole.shape[-2] // t), -(-whole.shape[-1] // t)), bool)
        needed[y0 // t:-(-y1 // t), x0 // t:-(-x1 // t)] = True  # the tiles under the box
        smooth = window(smooth_tiles(whole, fusion.smooth, t, needed=needed), *box, "mirror")

    def combine(z: int, sel: np.ndarray, p: np.ndarray) -> np.ndarray:
        return fusion.classes(ens[:, sel], p, None if smooth is None else smooth[:, sel])

    return _tiles_window(spec, models, initial, uncertainty, image, probabilities, box, tile,
                         settings, combine, rim_rule=fusion.rim)


#: the tile function of each ``block`` kind of the method registry (:mod:`volref.methods`)
TILES: dict[str, Callable[..., np.ndarray]] = {"tiles": _tiles_window, "fused": _fused_window,
                                               "crf": _crf_window}
