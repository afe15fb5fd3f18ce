"""The ensemble's and the refiner's class probabilities fused where the refiner rebuilds.

A removed pixel (uncertain, near a mitochondrion: :mod:`volref.stages.refine`) has two estimates
of its class, the two factors the paper's model names: the ensemble's ``P(Y_i | X)`` — from the
image, which a weak stain has blurred — and the MAE's ``P(Y_i | Y_-i)`` — from the labels
around it, blind to the image. Neither alone beats the initial labels inside low-SNR spots: the
ensemble under-calls the faint mitochondrion, the MAE loses its extent where a spot removes
most of a section. A multinomial logistic model on both log-probabilities (``2C`` features and a
bias -> ``C`` logits; 36 numbers for 4 classes), fitted on validation phantoms with ground truth
(:func:`volref.train.fusion.fit_fusion`, ``volref train fusion``), decides the class. It learns, among other
things, how much an uncertain pixel next to a mitochondrion is more likely mitochondrion than
either model says.

Only removed pixels change; every other pixel keeps its initial class. The logits are summed
feature by feature in a fixed order, so a pixel's class depends on its probability vectors
alone, never on how many pixels are fused at once (the same bytes for any block shape).

Topology (``smooth``, ``rim``; chosen on validation phantoms, ``experiments.fused_topology``).
The ensemble's probabilities inside a low-SNR spot are noisy pixel by pixel; decided pixel by
pixel, the inner structure (cristae + matrix) gets holes and spurs (skeleton cycles 1.5 a tile
against 0.03 on plausible tiles) and touches the background where a spot cut the IMS rim. So:

* ``smooth``: which of background / IMS / inner structure a pixel is comes from the ensemble's
  probabilities smoothed by a Gaussian of ``smooth`` px, each of the ensemble's own tiles on its
  own (:func:`smooth_tiles`: the tiles are global, so every block smooths alike); cristae or
  matrix, inside the inner structure, still from the unsmoothed ones (smoothing wipes out thin
  cristae).
* ``rim``: a rebuilt cristae or matrix pixel beside background becomes IMS (the inner membrane
  never meets the cytosol) — :func:`volref.stages.refine.rim`.

A fusion file from before these existed says neither and keeps its per-pixel rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from volref.classes import CRISTAE, MATRIX

#: probabilities are clipped to at least this before their logarithm
FLOOR = 1e-4
FUSION_KIND = "volref-fusion"
#: the smoothing Gaussian's reach, in sigmas (as the refiner's own smoothing)
TRUNCATE = 3.0
#: the recipe of fusions made now (files that do not name one keep 0 and False)
SMOOTH, RIM = 2.0, True


@dataclass(frozen=True)
class Fusion:
    """``logits = bias + sum_k features_k * weights[k]``, features ``log p_ens`` then
    ``log p_refiner`` (each clipped to ``floor``); ``smooth``, ``rim``: the module's doc."""

    weights: tuple[tuple[float, ...], ...]  # (2C, C)
    bias: tuple[float, ...]  # (C,)
    floor: float = FLOOR
    smooth: float = SMOOTH  # px: the ensemble's probabilities smoothed for the outline (0: not)
    # rebuilt inner structure beside background becomes IMS, and rebuilt IMS or background that
    # inner structure encloses becomes inner structure (volref.stages.refine.rim, fill_enclosed)
    rim: bool = RIM

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        c = len(self.bias)
        if w.shape != (2 * c, c) or not np.isfinite(w).all() or not np.all(np.isfinite(self.bias)):
            raise ValueError(f"a fusion of {c} classes needs finite weights of shape "
                             f"({2 * c}, {c}), got {w.shape}")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"floor must lie in (0, 1), got {self.floor}")
        if not (np.isfinite(self.smooth) and 0.0 <= self.smooth <= 16.0):
            raise ValueError(f"smooth must lie in [0, 16] px, got {self.smooth}")

    @property
    def n_classes(self) -> int:
        return len(self.bias)

    def logits(self, ensemble: np.ndarray, refiner: np.ndarray) -> np.ndarray:
        """``(C, n)`` float64 logits of ``n`` pixels from both ``(C, n)`` probabilities."""
        c = self.n_classes
        if ensemble.shape != refiner.shape or ensemble.shape[0] != c:
            raise ValueError(f"fusion needs two ({c}, n) probability arrays, got "
                             f"{ensemble.shape} and {refiner.shape}")
        out = np.repeat(np.asarray(self.bias, np.float64)[:, None], ensemble.shape[1], axis=1)
        w = np.asarray(self.weights, np.float64)
        for k, f in enumerate(features(ensemble, refiner, self.floor)):
            out += w[k][:, None] * f[None, :]
        return out

    def classes(self, ensemble: np.ndarray, refiner: np.ndarray,
                smoothed: np.ndarray | None = None) -> np.ndarray:
        """The fused class (uint8) of each of ``n`` pixels; ties go to the lower class. With
        ``smoothed`` (the ensemble's probabilities after :func:`smooth_tiles`, ``(C, n)``):
        background, IMS or inner structure from those, cristae or matrix from ``ensemble``."""
        if smoothed is None:
            return self.logits(ensemble, refiner).argmax(axis=0).astype(np.uint8)
        out = self.logits(smoothed, refiner).argmax(axis=0).astype(np.uint8)
        inner = (out == CRISTAE) | (out == MATRIX)
        if inner.any():
            raw = self.logits(ensemble[:, inner], refiner[:, inner])
            out[inner] = np.where(raw[CRISTAE] >= raw[MATRIX], CRISTAE, MATRIX)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"weights": [list(r) for r in self.weights], "bias": list(self.bias),
                "floor": self.floor, "smooth": self.smooth, "rim": self.rim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        smooth, rim = d.get("smooth", 0.0), d.get("rim", False)
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)):
            raise ValueError(f"not a fusion: smooth must be a number of pixels, got {smooth!r}")
        if not isinstance(rim, bool):
            raise ValueError(f"not a fusion: rim must be true or false, got {rim!r}")
        try:
            return cls(weights=tuple(tuple(float(v) for v in r) for r in d["weights"]),
                       bias=tuple(float(v) for v in d["bias"]),
                       floor=float(d.get("floor", FLOOR)), smooth=float(smooth), rim=rim)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a fusion: {exc}") from None

    @classmethod
    def identity(cls, n_classes: int) -> Fusion:
        """The ensemble's own argmax (the initial labels' rule)."""
        w = np.vstack([np.eye(n_classes), np.zeros((n_classes, n_classes))])
        return cls(tuple(tuple(r) for r in w.tolist()), (0.0,) * n_classes, smooth=0.0,
                   rim=False)


def smooth_tiles(probabilities: np.ndarray, sigma: float, tile: int,
                 origin: tuple[int, int] = (0, 0), extent: tuple[int, int] | None = None,
                 needed: np.ndarray | None = None) -> np.ndarray:
    """``probabilities (..., Y, X)`` smoothed by a Gaussian of ``sigma`` px, each ``tile x tile``
    tile of the ensemble's grid on its own (``origin``: the array's first pixel in the volume, a
    multiple of ``tile``; ``extent``: the volume's (Y, X) — a tile's part past it is left out, as
    where a whole slice ends). A pixel's value depends on its tile's probabilities alone, so any
    cut of the volume into blocks gives the same values. ``needed (..., Y/tile, X/tile)``: only
    those tiles (the others are returned as they were)."""
    out = probabilities.astype(np.float32, copy=True)
    if sigma <= 0:
        return out
    ny, nx = out.shape[-2:]
    oy, ox = origin
    ey, ex = extent if extent is not None else (oy + ny, ox + nx)
    outer = out.shape[:-2] if needed is None else needed.shape[:-2]  # what ``needed`` chooses by
    sigmas = (0.0,) * (out.ndim - 2 - len(outer)) + (sigma, sigma)  # no smoothing across classes
    for y in range(0, ny, tile):
        for x in range(0, nx, tile):
            win = (slice(y, min(y + tile, ey - oy)), slice(x, min(x + tile, ex - ox)))
            if win[0].stop <= y or win[1].stop <= x:
                continue  # wholly past the volume
            for idx in np.ndindex(*outer):
                if needed is not None and not needed[idx + (y // tile, x // tile)]:
                    continue
                part = idx + (...,) + win
                out[part] = ndimage.gaussian_filter(out[part], sigmas, mode="nearest",
                                                    truncate=TRUNCATE)
    return out


def features(ensemble: np.ndarray, refiner: np.ndarray, floor: float = FLOOR) -> list[np.ndarray]:
    """The ``2C`` feature rows ``(n,)`` float64: log-probabilities, the ensemble's first."""
    return [np.log(np.clip(p.astype(np.float64), floor, 1.0))
            for src in (ensemble, refiner) for p in src]


def save_fusion(path: str | os.PathLike, fusion: Fusion, card: dict[str, Any]) -> Path:
    """Write a fusion and its card (what it was fitted for and on) as JSON."""
    path = Path(path)
    path.write_text(json.dumps({"kind": FUSION_KIND, "fusion": fusion.to_dict(), "card": card},
                               indent=2, sort_keys=True) + "\n")
    return path


def read_fusion(path: str | os.PathLike) -> tuple[Fusion, dict[str, Any]]:
    """A fusion and its card from ``path`` (a file :func:`save_fusion` wrote)."""
    try:
        meta = json.loads(Path(path).read_text())
        if not isinstance(meta, dict) or meta.get("kind") != FUSION_KIND:
            raise ValueError(f"kind is not {FUSION_KIND}")
        card = meta.get("card", {})
        return Fusion.from_dict(meta["fusion"]), card if isinstance(card, dict) else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a volref fusion file ({exc})") from None
