"""How ``fused`` draws the outline: the ensemble's probabilities smoothed (``smooth`` px, within
its tiles) for background / IMS / inner structure, and the rim rule, swept on validation phantoms.

    python -m experiments.fused_topology --store V1.ome.zarr V2.ome.zarr ... C.ome.zarr \\
        [--smooth 0,1.5,2,3] [--every 4] [--json OUT]

Stores: segmented phantoms with ground truth — with low-SNR spots (their implausible tiles are
scored) and at least one without (``--degraded-fraction 0``: its plausible tiles make the control
group, as Table 2 selects them). Every variant is ``volref refine --method fused``'s own code
(:func:`volref.evaluate.methods.refine_slice`) on whole slices with the shipped fusion's weights.
Reported per variant: the five Table-2 metrics on the implausible tiles and their distance to the
control, Dice inside the spots (the implausible tiles' degraded pixels) and the mean Dice of the
four classes over the whole slices; the CNN-AE and the tiles' ground truth for reference.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from benchmarks.common import machine, parser, write_json
from experiments.common import command
from experiments.models import segmentation_dice
from volref.evaluate.methods import MethodSettings, refine_slice
from volref.evaluate.table2 import Table2Settings, load_slices, select, summarise
from volref.metrics import METRICS, tile_metrics
from volref.models.fusion import read_fusion
from volref.models.registry import DEFAULT_FUSION, load_refiner, load_segmenter


def variants(smooths: list[float]) -> dict[str, dict]:
    """name -> the fusion's topology settings."""
    out = {}
    for s in smooths:
        for rim in (False, True):
            out[f"smooth {s:g}{' + rim' if rim else ''}"] = {"smooth": s, "rim": rim}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "the first smoothing, with and without the rim; every 2nd slice")
    ap.add_argument("--store", nargs="+", required=True, dest="stores")
    ap.add_argument("--smooth", default="0,1.5,2,3")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--fusion", default=str(DEFAULT_FUSION))
    args = ap.parse_args(argv)
    smooths = [float(v) for v in args.smooth.split(",")]
    if args.quick:
        smooths, args.every = smooths[:1], 2
    torch.manual_seed(0)
    fusion, _ = read_fusion(args.fusion)
    ens = load_segmenter()
    models = {"fused": load_refiner(), "cnn-ae": load_refiner(method="cnn-ae")}
    t2 = Table2Settings(every=args.every)
    slices = [s for store in args.stores for s in load_slices(store, t2, ensemble=ens)]
    implausible, control, _ = select(slices, dataclasses.replace(t2, max_tiles=10**9))
    t = t2.tile
    labels: dict[str, list[np.ndarray]] = {
        "initial": [s.initial for s in slices], "truth": [s.truth for s in slices]}
    runs = {"cnn-ae": (models, MethodSettings()),
            **{name: ({"fused": models["fused"]},
                      MethodSettings(fusion=dataclasses.replace(fusion, **v)))
               for name, v in variants(smooths).items()}}
    for name, (m, ms) in runs.items():
        method = "cnn-ae" if name == "cnn-ae" else "fused"
        labels[name] = [refine_slice(method, m, initial=s.initial, uncertainty=s.uncertainty,
                                     image=s.image, probabilities=s.probabilities, tile=t,
                                     settings=ms) for s in slices]
        print(f"{name}: {len(slices)} slices", flush=True)
    index = {id(s): i for i, s in enumerate(slices)}
    ctrl = summarise([r.metrics for r in control])
    rows: dict[str, dict] = {"control": {"metrics": ctrl}}
    if not implausible:
        print("no implausible tiles: Table 2's metrics and the spots' Dice are empty")

    def flat(arrays: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, dtype)

    spots = flat([r.cut(r.slice.degraded, t) for r in implausible], bool)
    truth_spots = flat([r.cut(r.slice.truth, t) for r in implausible], np.uint8)
    for name, labs in labels.items():
        tiles = [r.cut(labs[index[id(r.slice)]], t) for r in implausible]
        met = summarise([tile_metrics(x) for x in tiles])
        pred_spots = flat(tiles, np.uint8)
        rows[name] = {
            "metrics": met,
            "distance_to_control": {k: abs(met[k]["mean"] - ctrl[k]["mean"]) for k in METRICS},
            "dice_spots": segmentation_dice(pred_spots[spots], truth_spots[spots], None),
            "dice_whole": segmentation_dice(np.stack(labs), np.stack(labels["truth"]), None)}
    print(table(rows))
    payload = {"machine": machine(), "stores": args.stores, "every": args.every,
               "fusion": args.fusion, "tiles": {"implausible": len(implausible),
                                                "control": len(control)},
               "rows": rows, "command": command("fused_topology", argv)}
    write_json(args.json, payload)
    return payload


def table(rows: dict) -> str:
    short = ("end points", "cycles", "boundary/area %", "cristae ratio %", "IM/background %")
    lines = ["| variant | " + " | ".join(short) + " | spots: mito / IMS / cristae / matrix | "
             "whole: mean of 4 |", "|---|" + "---|" * 7]
    for name, r in rows.items():
        cells = [f"{r['metrics'][m]['mean']:.2f}" for m in METRICS]
        if "dice_spots" in r:
            d = r["dice_spots"]
            pc = list(d["per_class"].values())
            cells += [f"{d['mitochondrion']:.3f} / {pc[1]:.3f} / {pc[2]:.3f} / {pc[3]:.3f}",
                      f"{r['dice_whole']['mean']:.4f}"]
        else:
            cells += ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
