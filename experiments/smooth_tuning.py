"""Choose ``RefineSettings.smooth`` on a *validation* phantom (never a held-out one): Table 2's
consistency metrics of the MAE-refined implausible tiles and its Dice inside degraded regions,
for each sigma, next to the initial labels and the control tiles.

    python -m experiments.smooth_tuning --store /tmp/val-500.ome.zarr [--refiner F]
        [--values 0,0.5,0.75,1,1.25,1.5,2] [--every 4] [--json OUT]

The store must be segmented and carry ``ground-truth`` and ``degraded`` label images (a phantom
made by ``volref synth`` and run through ``volref segment``).
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks.common import machine, write_json
from experiments.common import command, tuning_args
from volref.evaluate.methods import MethodSettings
from volref.evaluate.table2 import Table2Settings, evaluate_table2
from volref.metrics import METRICS
from volref.models.registry import load_refiner
from volref.stages.refine import RefineSettings

SHORT = {"skeleton_end_points": "end pts", "skeleton_cycles": "cycles",
         "boundary_area_ratio": "bound/area", "cristae_boundary_ratio": "cristae %",
         "inner_membrane_background_ratio": "IM/bg %"}


def main(argv: list[str] | None = None) -> dict:
    args, values = tuning_args(__doc__, "0,0.5,0.75,1,1.25,1.5,2", 4, argv)
    mae = load_refiner(args.refiner)
    table = Table2Settings(every=args.every)
    rows, reference = [], None
    for v in values:
        ms = MethodSettings(refine=dataclasses.replace(RefineSettings(), smooth=v))
        start = time.perf_counter()
        result, _ = evaluate_table2([args.store], {"mae": mae}, None, methods=("mae",), whole=False,
                                    settings=table, method_settings=ms, n_examples=0)
        if reference is None:
            reference = {k: {m: result["methods"][k][m]["mean"] for m in METRICS}
                         for k in ("initial", "control")}
            reference["initial"]["dice_degraded"] = result["dice_degraded"]["initial"]
            reference["tiles"] = result["tiles"]
            for k in ("initial", "control"):
                print(f"{k:>10}  " + "  ".join(f"{SHORT[m]} {reference[k][m]:6.2f}"
                                                for m in METRICS))
        row = {"smooth": v, **{m: result["methods"]["mae"][m]["mean"] for m in METRICS},
               "dice_degraded": result["dice_degraded"]["mae"],
               "seconds": time.perf_counter() - start}
        rows.append(row)
        d = row["dice_degraded"]
        print(f"smooth {v:4g}  " + "  ".join(f"{SHORT[m]} {row[m]:6.2f}" for m in METRICS)
              + f"  Dice mitochondrion {d['mitochondrion']:.3f} cristae {d['cristae']:.3f}",
              flush=True)
    payload = {"machine": machine(), "store": args.store, "every": args.every,
               "reference": reference, "rows": rows, "command": command("smooth_tuning", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
