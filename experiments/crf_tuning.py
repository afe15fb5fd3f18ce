"""Tune the dense-CRF baseline's kernel weights on a *validation* phantom (never a held-out one):
a grid over the smoothness and appearance kernels, scored by the mean per-class Dice against
ground truth inside degraded regions of the tiles the CRF relabels.

    python -m experiments.crf_tuning --store /tmp/val-500.ome.zarr [--every 8] [--json OUT]

The store must be segmented (``volref segment``) and carry ``ground-truth`` and ``degraded``
label images (``volref synth`` makes them). The winner becomes ``CRFSettings``' defaults, so the
baseline is compared at its best, as a fair comparison needs.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from benchmarks.common import machine, parser, write_json
from experiments.common import command, store_of, store_option
from volref.evaluate.methods import MethodSettings, refine_tile
from volref.evaluate.table2 import SliceData, Table2Settings, load_slices
from volref.metrics import dice_per_class
from volref.models.registry import load_segmenter
from volref.stages.crf import CRFSettings

GRID = {"smooth_weight": (1.0, 3.0), "appearance_weight": (0.0, 3.0, 10.0),
        "appearance_intensity": (8.0, 24.0, 64.0)}


def tiles_with_degraded(slices: list[SliceData], tile: int, limit: int) -> list[tuple]:
    found = []
    for sl in slices:
        ny, nx = sl.initial.shape
        for y in range(0, ny - tile + 1, tile):
            for x in range(0, nx - tile + 1, tile):
                deg = sl.degraded[y:y + tile, x:x + tile]
                if deg.mean() > 0.05 and (sl.truth[y:y + tile, x:x + tile][deg] > 0).any():
                    found.append((sl, y, x))
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "every 4th slice, two tiles, one point of the grid (a smoke run)")
    store_option(ap, "a segmented validation phantom with ground truth")
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--tiles", type=int, default=60)
    args = ap.parse_args(argv)
    if args.quick:
        args.every = 4
    store = store_of(args)
    ensemble = load_segmenter()
    slices = load_slices(store, Table2Settings(every=args.every), ensemble)
    tiles = tiles_with_degraded(slices, 128, 2 if args.quick else args.tiles)
    grid = {k: v[:1] for k, v in GRID.items()} if args.quick else GRID
    rows = []
    base = CRFSettings()
    for values in itertools.product(*grid.values()):
        crf = CRFSettings(**{**base.to_dict(), **dict(zip(grid, values))})
        start = time.perf_counter()
        pred, truth = [], []
        for sl, y, x in tiles:
            lab = refine_tile("crf", {}, initial=sl.initial, uncertainty=sl.uncertainty,
                              image=sl.image, probabilities=sl.probabilities, y=y, x=x,
                              tile=128, settings=MethodSettings(crf=crf))
            deg = sl.degraded[y:y + 128, x:x + 128]
            pred.append(lab[deg])
            truth.append(sl.truth[y:y + 128, x:x + 128][deg])
        d = dice_per_class(np.concatenate(pred), np.concatenate(truth), 4)
        rows.append({**dict(zip(grid, values)), "dice": d.tolist(), "mean_dice": float(d.mean()),
                     "seconds": time.perf_counter() - start})
        print(f"{dict(zip(grid, values))}  mean Dice {d.mean():.4f}  "
              f"({' '.join(f'{v:.3f}' for v in d)})", flush=True)
    initial = dice_per_class(np.concatenate([sl.initial[y:y + 128, x:x + 128][
        sl.degraded[y:y + 128, x:x + 128]] for sl, y, x in tiles]), np.concatenate(truth), 4)
    best = max(rows, key=lambda r: r["mean_dice"])
    print(f"initial labels: mean Dice {initial.mean():.4f}; best CRF: {best}")
    payload = {"machine": machine(), "store": args.store, "tiles": len(tiles),
               "initial_mean_dice": float(initial.mean()), "rows": rows, "best": best,
               "command": command("crf_tuning", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
