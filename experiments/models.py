"""The measures of the paper's model experiments on phantoms (METHOD.md, "Evaluation facts"),
used by ``experiments.paper_models`` and the setting sweeps.

* :func:`uncertainty_under_degradation` — §4.3: the same phantom with and without a degraded area
  along every mitochondrion's skeleton (one seed, so geometry and noise are identical outside the
  areas); mean ensemble uncertainty per area before and after.
* :func:`reconstruction_dice` — Table 1: clearly stained tiles of the ensemble's own segmentation,
  random removal of candidate patches at a given ratio, Dice of the MAE's reconstruction against
  the removed labels (strict per-class Dice, and the authors' micro Dice on certain pixels).
* :func:`segmentation_dice` — against ground truth, which the paper did not have: Dice per class
  of a label volume, in a region (clear or degraded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from volref.classes import BACKGROUND, CLASS_NAMES, N_CLASSES
from volref.metrics import confusion, dice, dice_per_class
from volref.models.mae import MaskedAutoencoder
from volref.train.refiner import patch_distance


def uncertainty_under_degradation(before: np.ndarray, after: np.ndarray, instances: np.ndarray,
                                  degraded: np.ndarray) -> dict[str, Any]:
    """Per-mitochondrion mean uncertainty in its degraded area, before and after degradation.

    ``before``/``after``: uncertainty volumes (float) of the clean and the degraded phantom;
    ``instances``: ground-truth ids; ``degraded``: the degraded phantom's area mask. An area is
    the part of a mitochondrion inside its degraded area.
    """
    area = np.where(degraded.astype(bool), instances, 0)
    ids = np.unique(area[area > 0])
    b = ndimage.mean(before, labels=area, index=ids)
    a = ndimage.mean(after, labels=area, index=ids)
    low = b <= np.percentile(b, 10)
    top60 = np.percentile(b, 40)  # entering the top 60 % of the before-distribution
    return {
        "areas": int(len(ids)),
        "mean_before": float(b.mean()),
        "mean_after": float(a.mean()),
        "relative_rise_percent": float(100.0 * (a.mean() / b.mean() - 1.0)),
        "median_per_area_rise_percent": float(np.median(100.0 * (a / np.maximum(b, 1e-6) - 1.0))),
        "lowest_decile_areas": int(low.sum()),
        "lowest_decile_moved_to_top60": int((a[low] >= top60).sum()),
        "lowest_decile_moved_to_top60_percent": float(100.0 * (a[low] >= top60).mean()),
    }


@dataclass(frozen=True)
class Tiles:
    labels: np.ndarray  # (T, 128, 128) uint8
    uncertainty: np.ndarray | None = None  # (T, 128, 128) float32 in [0, 1]


def clear_tiles(labels: np.ndarray, degraded: np.ndarray | None,
                uncertainty: np.ndarray | None = None, tile: int = 128,
                min_mito_fraction: float = 0.3, max_tiles: int | None = None,
                seed: int = 0) -> Tiles:
    """Non-overlapping tiles with > 30 % mitochondrion and no degraded voxel (with their
    uncertainty when given)."""
    picked = []
    nz, ny, nx = labels.shape
    for z in range(nz):
        for y in range(0, ny - tile + 1, tile):
            for x in range(0, nx - tile + 1, tile):
                lab = labels[z, y:y + tile, x:x + tile]
                if degraded is not None and degraded[z, y:y + tile, x:x + tile].any():
                    continue
                if (lab != BACKGROUND).mean() > min_mito_fraction:
                    picked.append((z, y, x))
    if max_tiles is not None and len(picked) > max_tiles:
        keep = np.sort(np.random.default_rng(seed).choice(len(picked), max_tiles, replace=False))
        picked = [picked[i] for i in keep]

    def cut(volume: np.ndarray, dtype) -> np.ndarray:
        if not picked:
            return np.empty((0, tile, tile), dtype)
        return np.stack([volume[z, y:y + tile, x:x + tile] for z, y, x in picked]).astype(dtype)

    return Tiles(cut(labels, np.uint8),
                 None if uncertainty is None else cut(uncertainty, np.float32))


#: the authors' reconstruction experiment scores removed pixels within 10 px of a mitochondrion
#: whose ensemble entropy is below a threshold (0.1, 0.2, 0.4), by micro-averaged Dice
SCORE_NEAR_PX = 10.0
SCORE_CERTAIN_BELOW = (0.1, 0.4)


@torch.no_grad()
def reconstruction_dice(model: MaskedAutoencoder, tiles: Tiles, ratio: float, seed: int = 0,
                        candidate_fraction: float = 0.7, batch: int = 16,
                        device: str = "cpu") -> dict:
    """Remove ``ratio`` of each tile's candidate patches, reconstruct, score the removed pixels.

    Three measures, from strict to the authors' own:

    * ``dice``/``mean_dice``: per class, pooled over all tiles, on every removed pixel, and
      their unweighted mean (a rare class counts as much as background);
    * ``tile_dice``/``mean_tile_dice``: the same on whole tiles after putting the
      reconstruction into the removed patches only, as refinement does;
    * ``micro_dice[t]``: micro-averaged Dice (= the fraction of pixels right) on removed pixels
      within 10 px of a mitochondrion whose uncertainty is below ``t`` — how the authors'
      reconstruction experiment scores its Table 1 (needs ``tiles.uncertainty``);
      ``recall[t]``, per class, the share of those pixels rebuilt as their own class (which
      class the misses are).
    """
    rng = np.random.default_rng(seed)
    p = model.config.patch
    g = tiles.labels.shape[1] // p
    inter, total = np.zeros(N_CLASSES), np.zeros(N_CLASSES)
    tile_inter, tile_total = np.zeros(N_CLASSES), np.zeros(N_CLASSES)
    right = {t: [0, 0] for t in SCORE_CERTAIN_BELOW}
    counts = {t: np.zeros((N_CLASSES, N_CLASSES), np.int64) for t in SCORE_CERTAIN_BELOW}
    accuracy = [0, 0]
    for i in range(0, len(tiles.labels), batch):
        labs = tiles.labels[i:i + batch]
        masks = np.zeros((len(labs), g * g), dtype=bool)
        near = np.zeros(labs.shape, dtype=bool)
        for j, lab in enumerate(labs):
            dist, pdist = patch_distance(lab, p)
            near[j] = dist <= SCORE_NEAR_PX
            cand = np.argsort(pdist, kind="stable")[: int(round(candidate_fraction * g * g))]
            masks[j, rng.choice(cand, int(round(ratio * len(cand))), replace=False)] = True
        logits = model(torch.from_numpy(labs).to(device), torch.from_numpy(masks).to(device))
        pred = logits.argmax(1).cpu().numpy().astype(np.uint8)
        pix = np.kron(masks.reshape(-1, g, g), np.ones((1, p, p), bool)).astype(bool)
        filled = np.where(pix, pred, labs)
        for c in range(N_CLASSES):
            a, b = (pred == c) & pix, (labs == c) & pix
            inter[c] += (a & b).sum()
            total[c] += a.sum() + b.sum()
            ta, tb = filled == c, labs == c
            tile_inter[c] += (ta & tb).sum()
            tile_total[c] += ta.sum() + tb.sum()
        hit = pred == labs
        accuracy[0] += int(hit[pix].sum())
        accuracy[1] += int(pix.sum())
        if tiles.uncertainty is not None:
            unc = tiles.uncertainty[i:i + batch]
            for t in SCORE_CERTAIN_BELOW:
                scored = pix & near & (unc < t)
                right[t][0] += int(hit[scored].sum())
                right[t][1] += int(scored.sum())
                counts[t] += confusion(labs[scored], pred[scored], N_CLASSES)
    per_class = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    per_tile = np.where(tile_total > 0, 2 * tile_inter / np.maximum(tile_total, 1), 1.0)
    out = {"ratio": ratio, "tiles": int(len(tiles.labels)),
           "dice": {CLASS_NAMES[c]: float(per_class[c]) for c in range(N_CLASSES)},
           "mean_dice": float(per_class.mean()),
           "tile_dice": {CLASS_NAMES[c]: float(per_tile[c]) for c in range(N_CLASSES)},
           "mean_tile_dice": float(per_tile.mean()),
           "pixel_accuracy": accuracy[0] / max(accuracy[1], 1)}
    if tiles.uncertainty is not None:
        out["micro_dice"] = {f"{t:g}": r[0] / max(r[1], 1) for t, r in right.items()}
        out["micro_dice_pixels"] = {f"{t:g}": r[1] for t, r in right.items()}
        out["recall"] = {f"{t:g}": {CLASS_NAMES[c]: float(m[c, c] / max(m[c].sum(), 1))
                                    for c in range(N_CLASSES)} for t, m in counts.items()}
    return out


def segmentation_dice(pred: np.ndarray, truth: np.ndarray, region: np.ndarray | None) -> dict:
    """Dice per class, their mean, and Dice of the mitochondrion as a whole, inside ``region``."""
    d = dice_per_class(pred, truth, N_CLASSES, region=region)
    if region is not None:
        pred, truth = pred[region.astype(bool)], truth[region.astype(bool)]
    return {"per_class": {CLASS_NAMES[c]: float(d[c]) for c in range(N_CLASSES)},
            "mean": float(d.mean()),
            "mitochondrion": dice(pred != BACKGROUND, truth != BACKGROUND)}
