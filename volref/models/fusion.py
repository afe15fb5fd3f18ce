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
feature by feature in a fixed order, so a pixel's class depends on its two probability vectors
alone, never on how many pixels are fused at once (the same bytes for any block shape).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: probabilities are clipped to at least this before their logarithm
FLOOR = 1e-4
FUSION_KIND = "volref-fusion"


@dataclass(frozen=True)
class Fusion:
    """``logits = bias + sum_k features_k * weights[k]``, features ``log p_ens`` then
    ``log p_refiner`` (each clipped to ``floor``)."""

    weights: tuple[tuple[float, ...], ...]  # (2C, C)
    bias: tuple[float, ...]  # (C,)
    floor: float = FLOOR

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        c = len(self.bias)
        if w.shape != (2 * c, c) or not np.isfinite(w).all() or not np.all(np.isfinite(self.bias)):
            raise ValueError(f"a fusion of {c} classes needs finite weights of shape "
                             f"({2 * c}, {c}), got {w.shape}")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"floor must lie in (0, 1), got {self.floor}")

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

    def classes(self, ensemble: np.ndarray, refiner: np.ndarray) -> np.ndarray:
        """The fused class (uint8) of each of ``n`` pixels; ties go to the lower class."""
        return self.logits(ensemble, refiner).argmax(axis=0).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": [list(r) for r in self.weights], "bias": list(self.bias),
                "floor": self.floor}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fusion:
        try:
            return cls(weights=tuple(tuple(float(v) for v in r) for r in d["weights"]),
                       bias=tuple(float(v) for v in d["bias"]),
                       floor=float(d.get("floor", FLOOR)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a fusion: {exc}") from None

    @classmethod
    def identity(cls, n_classes: int) -> Fusion:
        """The ensemble's own argmax (the initial labels' rule)."""
        w = np.vstack([np.eye(n_classes), np.zeros((n_classes, n_classes))])
        return cls(tuple(tuple(r) for r in w.tolist()), (0.0,) * n_classes)


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
