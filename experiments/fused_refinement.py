"""Does the fused refinement beat its input? Dice against ground truth inside the low-SNR spots
and over whole slices: initial labels, the paper's MAE, and ``fused`` (the MAE's and the
ensemble's probabilities combined where the MAE rebuilds, :mod:`volref.models.fusion`, as
``volref refine`` runs it: ``--fusion`` decides its smoothing and rim rule).

    python -m experiments.fused_refinement --store H1.ome.zarr H2.ome.zarr ... \\
        [--every 2] [--fusion F] [--json OUT]

Stores: phantoms with degraded areas (``volref synth --degraded-fraction``), segmented by
``volref segment``, that played no part in fitting the fusion (``volref train fusion``). Each
slice is refined whole, as ``volref refine`` refines it (background past the slice).
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import machine, parser, write_json
from experiments.common import command
from experiments.models import segmentation_dice
from volref.evaluate.methods import MethodSettings, refine_slice
from volref.evaluate.table2 import Table2Settings, load_slices
from volref.models.fusion import read_fusion
from volref.models.precision import in_precision
from volref.models.registry import DEFAULT_FUSION, load_refiner, load_segmenter
from volref.stages.refine import RefineSettings
from volref.train.fusion import rebuilt_probabilities

METHODS = ("initial", "mae", "fused")


def labels_of(stores: list[str], every: int, fusion) -> dict[str, np.ndarray]:
    """Every method's labels, the truth and the spots, stacked over the slices of ``stores``."""
    settings = RefineSettings()
    ens = load_segmenter()
    mae = in_precision(load_refiner(), settings.precision)
    out: dict[str, list[np.ndarray]] = {k: [] for k in (*METHODS, "truth", "spots")}
    for store in stores:
        for s in load_slices(store, Table2Settings(every=every), ensemble=ens):
            sel, p = rebuilt_probabilities(mae, s.initial, s.uncertainty, settings)
            refined = s.initial.copy()
            refined[sel] = p.argmax(axis=0)
            fused = refine_slice("fused", {"fused": mae}, initial=s.initial,
                                 uncertainty=s.uncertainty, image=s.image,
                                 probabilities=s.probabilities, tile=128,
                                 settings=MethodSettings(refine=settings, fusion=fusion))
            for k, v in (("initial", s.initial), ("mae", refined), ("fused", fused),
                         ("truth", s.truth), ("spots", s.degraded.astype(bool))):
                out[k].append(v)
            print(f"{store} z {s.z}: {int(sel.sum())} px rebuilt", flush=True)
    return {k: np.stack(v) for k, v in out.items()}


def scores(lab: dict[str, np.ndarray]) -> dict:
    spots, truth = lab["spots"], lab["truth"]
    return {m: {"spots": segmentation_dice(lab[m][spots], truth[spots], None),
                "whole": segmentation_dice(lab[m], truth, None),
                "changed_pct": 100.0 * float(np.mean(lab[m] != lab["initial"]))}
            for m in METHODS}


def table(rows: dict) -> str:
    lines = ["| method | spots: mitochondrion | IMS | cristae | matrix | whole: mean of 4 | "
             "whole: mitochondrion | voxels changed % |", "|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        s, w = r["spots"], r["whole"]
        pc = list(s["per_class"].values())
        lines.append(f"| {m} | {s['mitochondrion']:.3f} | {pc[1]:.3f} | {pc[2]:.3f} | "
                     f"{pc[3]:.3f} | {w['mean']:.4f} | {w['mitochondrion']:.3f} | "
                     f"{r['changed_pct']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "every 4th slice")
    ap.add_argument("--store", nargs="+", required=True, dest="stores",
                    help="segmented phantoms with ground truth and degraded areas")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--fusion", default=str(DEFAULT_FUSION))
    args = ap.parse_args(argv)
    if args.quick:
        args.every = 4
    torch.manual_seed(0)
    fusion, card = read_fusion(args.fusion)
    rows = scores(labels_of(args.stores, args.every, fusion))
    print(table(rows))
    payload = {"machine": machine(), "stores": args.stores, "every": args.every,
               "fusion": args.fusion, "fusion_data": card.get("data"), "rows": rows,
               "command": command("fused_refinement", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
