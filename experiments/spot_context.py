"""Why refined Dice inside low-SNR spots falls below the initial: the context or the holes' size?

    python -m experiments.spot_context --store STORE [--refiner F] [--every 8] [--json OUT]

Refines every N-th slice of a segmented phantom twice with the same removed patches (they follow
the ensemble's uncertainty): once from the ensemble's labels, as ``volref refine`` does, and once
from the ground truth, a perfect context. Both are scored on the removed pixels inside the spots
against the ground truth, next to the ensemble's own labels there. If even the perfect context
leaves the MAE below the ensemble, the removed areas are too large for a segmentation-only prior
to rebuild (its information is the context), not too noisy. The store must carry
``ground-truth`` and ``degraded`` label images.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import machine, parser, write_json
from experiments.common import command, refine_slice, store_of, store_option
from volref.classes import CLASS_NAMES, N_CLASSES
from volref.evaluate.table2 import Table2Settings, load_slices
from volref.metrics import confusion
from volref.models.registry import load_refiner
from volref.stages.refine import RefineSettings


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy, mitochondrion recall/precision and per-class recall of ``pred`` vs ``truth``
    (flat, same pixels), with the confusion matrix (rows: truth)."""
    cm = confusion(truth, pred, N_CLASSES)
    rows = np.maximum(cm.sum(axis=1), 1)
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "mitochondrion_recall": float(cm[1:, 1:].sum() / max(cm[1:].sum(), 1)),
        "mitochondrion_precision": float(cm[1:, 1:].sum() / max(cm[:, 1:].sum(), 1)),
        "recall": {name: float(cm[c, c] / rows[c]) for c, name in enumerate(CLASS_NAMES)},
        "confusion": cm.tolist(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "every 4th slice (a smoke run)")
    store_option(ap, "a segmented phantom with ground truth")
    ap.add_argument("--refiner", default=None)
    ap.add_argument("--every", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.every = 4
    store = store_of(args)
    mae = load_refiner(args.refiner)
    slices = load_slices(store, Table2Settings(every=args.every))
    settings = RefineSettings()
    m = settings.margin
    truth = np.stack([s.truth for s in slices])
    spots = np.stack([s.degraded for s in slices])
    # as volref refine runs: the removed patches follow the ensemble's uncertainty
    ensemble = [refine_slice(mae, np.pad(s.initial, m), np.pad(s.uncertainty, m), settings)
                for s in slices]
    # the same removed patches, rebuilt from the ground truth: only the context differs
    perfect = [_rebuild(mae, s.truth, r.removed, settings) for s, r in zip(slices, ensemble)]
    rows = {"ensemble (initial labels)": np.stack([s.initial for s in slices]),
            "MAE from the ensemble's labels": np.stack([r.labels for r in ensemble]),
            "MAE from the ground truth": np.stack([r.labels for r in perfect])}
    # scored: pixels in spots rebuilt in both runs
    scored = spots & np.stack([r.rebuilt for r in ensemble]) & np.stack([r.rebuilt for r in perfect])
    result = {name: scores(pred[scored], truth[scored]) for name, pred in rows.items()}
    share = float(scored.sum() / max(spots.sum(), 1))
    for name, r in result.items():
        print(f"{name:32s} accuracy {r['accuracy']:.3f}  mitochondrion recall "
              f"{r['mitochondrion_recall']:.3f}  cristae recall {r['recall']['cristae']:.3f}")
    print(f"removed: {100 * share:.1f} % of the spots' pixels ({len(slices)} slices)")
    payload = {"machine": machine(), "store": args.store, "slices": len(slices),
               "removed_share_of_spots": share, "removed_pixels": int(scored.sum()),
               "scores": result, "command": command("spot_context", argv)}
    write_json(args.json, payload)
    return payload


def _rebuild(mae, labels: np.ndarray, removed: np.ndarray, settings: RefineSettings):
    """``labels`` refined with the patches ``removed`` marks: their uncertainty is set to 1 and
    every other pixel's to 0 (a patch near no mitochondrion of ``labels`` stays; hence the
    scoring of pixels rebuilt in both runs)."""
    m = settings.margin
    forced = np.where(removed, np.float32(1.0), np.float32(0.0))
    return refine_slice(mae, np.pad(labels, m), np.pad(forced, m), settings)


if __name__ == "__main__":
    main()
