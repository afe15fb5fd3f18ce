"""Is the MAE's loss inside low-SNR spots a class-prior bias? Calibrate its class prior on a
*validation* phantom and see whether the gain carries over to held-out ones.

    python -m experiments.prior_calibration --store /tmp/val-500.ome.zarr [--refiner F]
        [--every 4] [--heldout STORE ...] [--heldout-every 8] [--json OUT]

The MAE rebuilds the removed patches from their context alone. Compare the class shares of the
pixels it rebuilds with the ground truth's there: a model that under-calls a class where it is
unsure (argmax favours the majority) shows it as a skewed composition. The script fits one
log-prior offset per class, added to the MAE's logits (logit adjustment for label shift, Saerens
et al. 2002), so that the refined labels' class shares on the removed pixels of the validation
slices equal the ground truth's (damped fixed-point iteration ``offset += 0.8 * log(truth share
/ refined share)``, background held at 0). Then it scores Dice, per class and for the mitochondrion as a
whole, inside the spots (``degraded``) and over whole slices — initial, uncalibrated MAE,
calibrated MAE — on the validation slices and, with ``--heldout``, on held-out phantoms that
played no part in the fit. Stores must be segmented and carry ``ground-truth`` and ``degraded``.
The calibration is an experiment here, not a volref setting (BENCHMARKS.md says why).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from benchmarks.common import machine, parser, write_json
from experiments.common import command, refine_slice, store_of, store_option
from experiments.models import segmentation_dice
from volref.classes import CLASS_NAMES, N_CLASSES
from volref.evaluate.table2 import Table2Settings, load_slices
from volref.models.precision import in_precision
from volref.models.registry import load_refiner
from volref.stages.refine import RefineSettings


class PriorShifted(nn.Module):
    """A tile refiner whose logits get a constant per-class offset (its class prior x e^offset).
    The offsets stay fp32 whatever precision the refiner runs in. With ``cache`` (a dict shared
    between instances) the refiner's own logits are kept per input: the offsets do not change
    what the refiner sees, so the fit's iterations after the first run no model."""

    def __init__(self, model: nn.Module, offsets: np.ndarray, cache: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.offsets = torch.tensor(offsets, dtype=torch.float32).view(1, -1, 1, 1)
        self.cache = cache

    @property
    def config(self):
        return self.model.config

    @property
    def needs_image(self) -> bool:
        return getattr(self.model, "needs_image", False)

    def forward(self, labels: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
        if self.cache is None:
            logits = self.model(labels, mask, **kw).float()
        else:
            key = hashlib.sha1(labels.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes())
            logits = self.cache.get(key.hexdigest())
            if logits is None:
                logits = self.cache[key.hexdigest()] = self.model(labels, mask, **kw).float()
        return logits + self.offsets.to(logits.device)


def refine_all(model: nn.Module, slices: list) -> tuple[np.ndarray, np.ndarray]:
    """Refined labels and removed pixels of each slice, as ``volref refine`` makes them."""
    settings = RefineSettings()
    m = settings.margin
    out = [refine_slice(model, np.pad(s.initial, m), np.pad(s.uncertainty, m), settings)
           for s in slices]
    return np.stack([r.labels for r in out]), np.stack([r.removed for r in out])


def shares(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=N_CLASSES) / max(labels.size, 1)


def fit(mae: nn.Module, slices: list, iterations: int, step: float = 0.8,
        tol: float = 0.002) -> dict:
    """Offsets that give the refined labels the ground truth's class shares on removed pixels
    (damped: cristae and matrix logits move together, a full step overshoots)."""
    truth = np.stack([s.truth for s in slices])
    offsets = np.zeros(N_CLASSES)
    history = []
    cache: dict = {}
    for it in range(iterations):
        refined, removed = refine_all(PriorShifted(mae, offsets, cache), slices)
        target, got = shares(truth[removed]), shares(refined[removed])
        history.append({"offsets": offsets.tolist(), "shares": got.tolist()})
        print(f"iteration {it:2d}: offsets {np.round(offsets, 2)} shares {np.round(got, 3)} "
              f"(truth {np.round(target, 3)})", flush=True)
        if np.abs(got - target).max() < tol:
            break
        offsets = offsets + step * np.log(target / np.maximum(got, 1e-4))
        offsets -= offsets[0]
    return {"offsets": offsets.tolist(), "iterations": len(history), "step": step,
            "history": history}


def scores(slices: list, models: dict[str, nn.Module]) -> dict:
    """Dice inside the spots and over whole slices, and class shares on the removed pixels."""
    truth = np.stack([s.truth for s in slices])
    spots = np.stack([s.degraded for s in slices])
    rows, removed = {}, None
    labels = {"initial": np.stack([s.initial for s in slices])}
    for name, model in models.items():
        labels[name], removed = refine_all(model, slices)
    for name, lab in labels.items():
        rows[name] = {"spots": segmentation_dice(lab[spots], truth[spots], None),
                      "whole": segmentation_dice(lab, truth, None),
                      "removed_shares": shares(lab[removed]).tolist()}
    rows["truth"] = {"removed_shares": shares(truth[removed]).tolist()}
    return rows


def table(title: str, rows: dict) -> str:
    names = [n.split()[0] for n in CLASS_NAMES]
    head = (f"| {title} | spots: mito | " + " | ".join(names) + " | whole: mito | mean of 4 | "
            "shares of removed px (" + "/".join(names) + ") |")
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for name, r in rows.items():
        share = "/".join(f"{x:.3f}" for x in r["removed_shares"])
        if "spots" not in r:
            lines.append(f"| {name} |" + " |" * (len(names) + 3) + f" {share} |")
            continue
        s, w = r["spots"], r["whole"]
        lines.append(f"| {name} | {s['mitochondrion']:.3f} | " + " | ".join(
            f"{x:.3f}" for x in s["per_class"].values()) + f" | {w['mitochondrion']:.3f} | "
            f"{w['mean']:.3f} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "every 4th validation slice, 2 iterations at most (a smoke run)")
    store_option(ap, "the validation phantom (the fit)")
    ap.add_argument("--refiner", default=None)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=80)
    ap.add_argument("--heldout", nargs="*", default=[], help="held-out phantoms (scored only)")
    ap.add_argument("--heldout-every", type=int, default=8)
    args = ap.parse_args(argv)
    if args.quick:
        args.every, args.iterations = 4, 2
    store = store_of(args)
    # in the refinement's precision already, so that refine uses the wrappers as they are (a
    # cast copy would copy the cache too)
    mae = in_precision(load_refiner(args.refiner), RefineSettings().precision)
    val = load_slices(store, Table2Settings(every=args.every))
    fitted = fit(mae, val, args.iterations)
    models = {"MAE": mae, "MAE, calibrated": PriorShifted(mae, np.asarray(fitted["offsets"]))}
    payload = {"machine": machine(), "store": args.store, "every": args.every, "fit": fitted,
               "validation": scores(val, models)}
    print(table("validation", payload["validation"]))
    if args.heldout:
        held = [s for st in args.heldout
                for s in load_slices(st, Table2Settings(every=args.heldout_every))]
        payload["heldout"] = {"stores": args.heldout, "every": args.heldout_every,
                              "rows": scores(held, models)}
        print(table("held-out", payload["heldout"]["rows"]))
    payload["command"] = command("prior_calibration", argv)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
