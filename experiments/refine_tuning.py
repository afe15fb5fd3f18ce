"""Choose ``RefineSettings.max_removed`` on a *validation* phantom (never a held-out one): refine
every N-th slice with each candidate value and score Dice against ground truth inside the
degraded regions, per class and for the mitochondrion as a whole.

    python -m experiments.refine_tuning --store /tmp/val-500.ome.zarr [--refiner F]
        [--values 1,0.9,0.75,0.6,0.5] [--every 8] [--json OUT]

A tile whose near-mitochondrion patches are nearly all removed leaves the MAE nothing to rebuild
from; past some share the ensemble's own labels are the better guess. The store must be segmented
and carry ``ground-truth`` and ``degraded`` label images.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from benchmarks.common import machine, write_json
from experiments.common import command, refine_slice, tuning_args
from experiments.models import segmentation_dice
from volref.evaluate.table2 import Table2Settings, load_slices
from volref.models.registry import load_refiner
from volref.stages.refine import RefineSettings


def main(argv: list[str] | None = None) -> dict:
    args, values = tuning_args(__doc__, "1,0.9,0.75,0.6,0.5", 8, argv)
    mae = load_refiner(args.refiner)
    slices = load_slices(args.store, Table2Settings(every=args.every))
    truth = np.stack([s.truth for s in slices])
    region = np.stack([s.degraded for s in slices])
    initial = np.stack([s.initial for s in slices])
    rows = [{"max_removed": None, **segmentation_dice(initial[region], truth[region], None)}]
    m = RefineSettings().margin
    for v in values:
        settings = dataclasses.replace(RefineSettings(), max_removed=v)
        start = time.perf_counter()
        refined = np.stack([refine_slice(mae, np.pad(s.initial, m), np.pad(s.uncertainty, m),
                                         settings).labels for s in slices])
        d = segmentation_dice(refined[region], truth[region], None)
        rows.append({"max_removed": v, **d, "seconds": time.perf_counter() - start})
        print(f"max_removed {v}: mitochondrion {d['mitochondrion']:.4f}  " + "  ".join(
            f"{k} {x:.4f}" for k, x in d["per_class"].items()), flush=True)
    print(f"initial: mitochondrion {rows[0]['mitochondrion']:.4f}  " + "  ".join(
        f"{k} {x:.4f}" for k, x in rows[0]["per_class"].items()))
    payload = {"machine": machine(), "store": args.store, "slices": len(slices), "rows": rows,
               "command": command("refine_tuning", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
