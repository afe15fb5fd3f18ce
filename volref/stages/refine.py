"""MAE refinement of one z-slice: remove uncertain patches near mitochondria, rebuild them.

Everything sits on global grids, so a pixel's result depends on the volume alone, not on blocks:

* patches: 4x4 pixels from the slice's origin. A patch is *removed* when its mean normalised
  entropy exceeds ``tau`` (0.4) and it lies within ``near_px`` of a mitochondrion pixel (any
  non-background class of the initial segmentation); far patches are never touched.
* tiles: 128x128, origins every ``stride`` pixels starting at ``stride - tile``, so every pixel
  is covered by ``(tile/stride)**2`` tiles::

      origin -64   0   64  128 …     (tile 128, stride 64)
             [-------)
                 [-------)
                     [-------)

  A tile goes through the MAE only if it holds a removed patch; it sees its other patches.
* blending: each tile's class probabilities for removed pixels are weighted by a smooth window
  (sin x sin, positive everywhere) and averaged over the tiles covering the pixel; the refined
  class is the argmax. Pixels of patches that were not removed keep their initial class exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from volref.classes import BACKGROUND
from volref.models.mae import MaskedAutoencoder


@dataclass(frozen=True)
class RefineSettings:
    tile: int = 128
    stride: int = 64
    tau: float = 0.4
    near_px: float = 16.0
    batch: int = 32

    def __post_init__(self) -> None:
        if self.tile % self.stride or self.stride % 4:
            raise ValueError("stride must divide the tile and be a multiple of the patch (4)")

    @property
    def margin(self) -> int:
        """Pixels of context a slice needs around itself (the tiles' reach past it)."""
        return self.tile - self.stride

    def to_dict(self) -> dict[str, float]:
        return {"tile": self.tile, "stride": self.stride, "tau": self.tau,
                "near_px": self.near_px, "batch": self.batch}


def removal_mask(labels: np.ndarray, uncertainty: np.ndarray, patch: int, tau: float,
                 near_px: float) -> np.ndarray:
    """Patches to remove ``(H/p, W/p)`` of a slice ``(H, W)`` (H, W multiples of ``patch``)."""
    h, w = labels.shape
    mean_u = uncertainty.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))
    mito = labels != BACKGROUND
    if not mito.any():
        return np.zeros(mean_u.shape, dtype=bool)
    dist = ndimage.distance_transform_edt(~mito)
    near = dist.reshape(h // patch, patch, w // patch, patch).min(axis=(1, 3)) <= near_px
    return (mean_u > tau) & near


def window(tile: int) -> np.ndarray:
    s = np.sin(np.pi * (np.arange(tile) + 0.5) / tile)
    return np.outer(s, s).astype(np.float32)


@dataclass
class RefinedSlice:
    labels: np.ndarray  # (Y, X) uint8
    removed: np.ndarray  # (Y, X) bool, pixels of removed patches
    tiles_total: int
    tiles_run: int


@torch.no_grad()
def refine_slice(model: MaskedAutoencoder, labels: np.ndarray, uncertainty: np.ndarray,
                 settings: RefineSettings, device: str | torch.device = "cpu",
                 autocast: bool = False) -> RefinedSlice:
    """Refine one slice given with ``settings.margin`` pixels of context on every side.

    ``labels``/``uncertainty``: ``(Y + 2m, X + 2m)`` with m = margin; outside the volume pass
    background and zero uncertainty. Y and X may be anything; the slice is padded internally.
    """
    t, st, m = settings.tile, settings.stride, settings.margin
    p = model.config.patch
    if model.config.tile != t:
        raise ValueError(f"the MAE expects {model.config.tile}-pixel tiles, settings say {t}")
    ny, nx = labels.shape[0] - 2 * m, labels.shape[1] - 2 * m
    # pad bottom/right so that tiles starting before the slice's end fit
    py, px = (-(ny + m)) % st + m, (-(nx + m)) % st + m
    py, px = py + (-(ny + 2 * m + py)) % p, px + (-(nx + 2 * m + px)) % p
    lab = np.pad(labels, ((0, py), (0, px)), constant_values=BACKGROUND)
    unc = np.pad(uncertainty, ((0, py), (0, px)), constant_values=0.0)
    remove = removal_mask(lab, unc, p, settings.tau, settings.near_px)  # (gh, gw) on padded grid
    origins = [(y, x) for y in range(0, ny + m, st) for x in range(0, nx + m, st)]
    g = t // p
    todo = [(y, x) for y, x in origins if remove[y // p:y // p + g, x // p:x // p + g].any()]
    acc = np.zeros((model.config.n_classes,) + lab.shape, dtype=np.float32)
    wsum = np.zeros(lab.shape, dtype=np.float32)
    win = window(t)
    for i in range(0, len(todo), settings.batch):
        chunk = todo[i:i + settings.batch]
        tiles = np.stack([lab[y:y + t, x:x + t] for y, x in chunk])
        masks = np.stack([remove[y // p:y // p + g, x // p:x // p + g].ravel() for y, x in chunk])
        x_lab = torch.from_numpy(tiles).to(device)
        x_mask = torch.from_numpy(masks).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x_lab, x_mask)
        prob = torch.softmax(logits.float(), dim=1).cpu().numpy()  # (B, C, t, t)
        for (y, x), pr in zip(chunk, prob):
            acc[:, y:y + t, x:x + t] += pr * win
            wsum[y:y + t, x:x + t] += win
    removed = np.kron(remove, np.ones((p, p), dtype=bool)).astype(bool)
    out = lab.copy()
    sel = removed & (wsum > 0)
    out[sel] = acc[:, sel].argmax(axis=0).astype(np.uint8)
    core = (slice(m, m + ny), slice(m, m + nx))
    return RefinedSlice(labels=out[core], removed=removed[core], tiles_total=len(origins),
                        tiles_run=len(todo))
