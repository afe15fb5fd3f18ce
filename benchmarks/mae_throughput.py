"""MAE refinement throughput: the reference per-tile loop vs volref's batched path, with and without
tile skipping, on the same tiles and weights, side by side in one run.

    python -m benchmarks.mae_throughput [--store demo/phantom.ome.zarr] [--slices 2]
                                        [--repeats 3] [--quick] [--json OUT]

Tiles are every 128-px tile of the global grid (stride 64) over ``--slices`` z-slices of a store
that ``volref run`` (or ``make demo``) has segmented. tiles/s counts every tile of those slices,
whether the model saw it or not:

* ``per_tile_loop``: batch 1, every tile through the model (the authors' reference pattern);
* ``batched``: volref's fixed-shape batches, every tile through the model;
* ``batched_skipping``: volref's path on this device: only tiles holding an uncertain patch near a
  mitochondrion, in the batch ``RefineSettings.batch_for`` picks (1 on the CPU, 32 on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import zarr

from benchmarks.common import machine, write_json
from volref.models.mae import mae_flops
from volref.models.registry import DEFAULT_REFINER, load_refiner
from volref.stages.refine import RefineSettings, removal_mask
from volref.stages.segment import uncertainty_from_uint8


def tiles_of(store: str, n_slices: int, settings: RefineSettings):
    root = zarr.open_group(store, mode="r")
    labels = root["labels/volref-initial/s0"]
    unc = root["volref/uncertainty/s0"]
    lead = (0,) * (labels.ndim - 3)
    nz = labels.shape[-3]
    t, st, m = settings.tile, settings.stride, settings.margin
    out = []
    for z in np.linspace(0, nz - 1, n_slices).astype(int):
        lab = np.pad(np.asarray(labels[lead + (z,)]), m)
        u = np.pad(uncertainty_from_uint8(np.asarray(unc[lead + (z,)])), m)
        h, w = lab.shape
        lab = np.pad(lab, ((0, (-h) % t), (0, (-w) % t)))
        u = np.pad(u, ((0, (-h) % t), (0, (-w) % t)))
        remove = removal_mask(lab, u, 4, settings.tau, settings.near_px)
        g = t // 4
        for y in range(0, lab.shape[0] - t + 1, st):
            for x in range(0, lab.shape[1] - t + 1, st):
                out.append((lab[y:y + t, x:x + t], remove[y // 4:y // 4 + g, x // 4:x // 4 + g]))
    return out


@torch.no_grad()
def run_mode(model, tiles, mode: str, batch: int) -> tuple[float, int, float]:
    if mode == "batched_skipping":
        batch = RefineSettings().batch_for("cpu")
    """Seconds, tiles seen by the model, FLOPs spent."""
    g2 = (model.config.tile // model.config.patch) ** 2
    if mode == "per_tile_loop":
        todo = tiles
    elif mode == "batched":
        todo = tiles
    else:
        todo = [(lab, r) for lab, r in tiles if r.any() and not r.all()]
    flops = sum(mae_flops(model.config, int((~r).sum()), g2) for _, r in todo)
    start = time.perf_counter()
    if mode == "per_tile_loop" or batch == 1:
        for lab, r in todo:
            model(torch.from_numpy(lab[None]), torch.from_numpy(r.ravel()[None]))
    else:
        for i in range(0, len(todo), batch):
            part = todo[i:i + batch]
            labs = np.zeros((batch,) + part[0][0].shape, dtype=part[0][0].dtype)
            masks = np.zeros((batch, g2), dtype=bool)
            for k, (lab, r) in enumerate(part):
                labs[k], masks[k] = lab, r.ravel()
            model(torch.from_numpy(labs), torch.from_numpy(masks), pad_to=g2)
    return time.perf_counter() - start, len(todo), flops


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="demo/phantom.ome.zarr")
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="1 slice, 1 repeat")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.repeats = 1, 1
    settings = RefineSettings()
    model = load_refiner(DEFAULT_REFINER)
    tiles = tiles_of(args.store, args.slices, settings)
    rows = {}
    for mode in ("per_tile_loop", "batched", "batched_skipping"):
        runs = [run_mode(model, tiles, mode, args.batch) for _ in range(args.repeats)]
        secs = [r[0] for r in runs]
        med = statistics.median(secs)
        rows[mode] = {"tiles": len(tiles), "tiles_run": runs[0][1], "seconds": secs,
                      "median_s": med, "tiles_per_s": len(tiles) / med,
                      "gflop_per_s": runs[0][2] / med / 1e9}
        print(f"{mode:<18} {len(tiles):>5} tiles ({runs[0][1]:>5} run) {med:8.2f} s "
              f"{len(tiles) / med:8.2f} tiles/s {runs[0][2] / med / 1e9:7.1f} GFLOP/s", flush=True)
    base = rows["per_tile_loop"]["tiles_per_s"]
    for mode in ("batched", "batched_skipping"):
        rows[mode]["vs_per_tile_loop"] = rows[mode]["tiles_per_s"] / base
        print(f"{mode} / per_tile_loop: {rows[mode]['vs_per_tile_loop']:.2f}x")
    payload = {"machine": machine(), "torch_threads": torch.get_num_threads(),
               "store": args.store, "slices": args.slices, "repeats": args.repeats, **rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
