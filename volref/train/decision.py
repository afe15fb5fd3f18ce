"""Fitting the ensemble's decision on phantoms with ground truth: one log-probability offset per
class added before the argmax (:meth:`volref.models.ensemble.Ensemble.decide`), chosen for the
mean Dice of the four classes in the clean region (outside ``degraded``) of every phantom, each
phantom counting alike (a sparse one as much as a dense one).

Why: the ensemble is trained with class weights (background 0.5, IMS and cristae 1.5) and a soft
Dice term, so its probabilities are not balanced for the argmax to score best; on validation
phantoms it called too much IMS and too little matrix. Four numbers fitted afterwards move the
balance back without retraining; the uncertainty stays the entropy of the probabilities.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volref import __version__
from volref.classes import N_CLASSES
from volref.errors import VolrefError
from volref.io import label_names, open_group, open_image
from volref.io.region import read_padded, reflect
from volref.layout import DEGRADED, GROUND_TRUTH, finest, label_path
from volref.metrics.dice import confusion
from volref.models.checkpoint import load_tensors, save_tensors
from volref.models.registry import DEFAULT_SEGMENTER, file_hash, load_segmenter
from volref.pipeline.intensity import volume_intensity
from volref.stages.normalise import normalise
from volref.stages.segment import segment_probabilities
from volref.stages.settings import SegmentSettings

#: the coarse grid of every offset (background's stays 0), then coordinate steps that halve
GRID = tuple(np.round(np.arange(-1.5, 1.51, 0.5), 2))
STEPS = (0.25, 0.125, 0.0625)
GRID_PIXELS = 200_000


@dataclass
class DecisionSample:
    """The clean pixels of one phantom: log mean probabilities ``(C, n)`` and true classes."""

    name: str
    log_p: np.ndarray
    truth: np.ndarray


def decision_sample(store: str | os.PathLike, every: int, ensemble, segmenter_path,
                    settings: SegmentSettings,
                    log: Callable[[str], None] | None = None) -> DecisionSample:
    """Every ``every``-th slice of a phantom with ground truth (``volref synth``), normalised as
    ``volref segment`` would with this ensemble: its clean pixels' log probabilities."""
    vol = open_image(store)
    root = open_group(store, mode="r")
    missing = [n for n in (GROUND_TRUTH, DEGRADED) if n not in label_names(root)]
    if missing:
        raise VolrefError(f"{store}: no label image {', '.join(missing)} (fitting a decision "
                          "needs ground truth: a phantom made by volref synth)")
    truth_arr, degraded_arr = (finest(root, label_path(n)) for n in (GROUND_TRUTH, DEGRADED))
    irange = volume_intensity(vol, segmenter_path, settings)[0]
    nz, h = vol.shape[0], settings.halo
    log_p, truth = [], []
    for z in range(every // 2, nz, every):
        zs = reflect(np.arange(z - 1, z + 2), nz)  # mirrored at the ends, as segment reads
        stack = normalise(np.asarray(vol.data[zs].compute()), irange)
        ny, nx = stack.shape[1:]
        padded = read_padded(stack, (0, -h, -h), (3, ny + h, nx + h), "mirror")
        p = segment_probabilities(ensemble, padded, settings)[0]
        clean = np.asarray(degraded_arr[z]) == 0
        log_p.append(np.log(np.maximum(p[:, clean], 1e-12)).astype(np.float32))
        truth.append(np.asarray(truth_arr[z])[clean].astype(np.uint8))
        if log is not None:
            log(f"{store}: slice {z}, {int(clean.sum())} clean pixels")
    if not truth:  # every > the number of slices
        return DecisionSample(Path(store).name, np.zeros((N_CLASSES, 0), np.float32),
                              np.zeros(0, np.uint8))
    return DecisionSample(Path(store).name, np.concatenate(log_p, axis=1),
                          np.concatenate(truth))


def mean_dice(sample: DecisionSample, offsets: Sequence[float]) -> np.ndarray:
    """Dice of each class (1 where a class is absent from both) of the decision ``offsets``."""
    pred = (sample.log_p + np.asarray(offsets, np.float32)[:, None]).argmax(axis=0)
    m = confusion(sample.truth, pred, N_CLASSES).astype(np.float64)
    total = m.sum(axis=0) + m.sum(axis=1)
    return np.where(total > 0, 2 * np.diag(m) / np.maximum(total, 1), 1.0)


def fit_offsets(samples: Sequence[DecisionSample]) -> tuple[list[float], dict[str, Any]]:
    """Offsets (background's 0) that maximise the mean over ``samples`` of each one's mean Dice
    of the four classes: the best of a coarse grid (on up to ``GRID_PIXELS`` of each), then
    coordinate steps of halving size (on all).
    Returns them and a record (each sample's Dice before and after)."""
    if not samples or not any(s.truth.size for s in samples):
        raise VolrefError("no clean pixel in these phantoms: nothing to fit a decision on")

    def score(off: Sequence[float], among: Sequence[DecisionSample] = samples) -> float:
        return float(np.mean([mean_dice(s, off).mean() for s in among]))

    # the grid on a regular subsample of each phantom (every k-th clean pixel), the steps on all
    thin = [DecisionSample(s.name, s.log_p[:, ::k], s.truth[::k]) for s in samples
            for k in [max(1, s.truth.size // GRID_PIXELS)]]
    best = max(((0.0, *g) for g in itertools.product(GRID, repeat=N_CLASSES - 1)),
               key=lambda off: score(off, thin))
    offsets, current = list(best), score(best)
    for step in STEPS:
        improved = True
        while improved:
            improved = False
            for c, d in itertools.product(range(1, N_CLASSES), (-step, step)):
                trial = list(offsets)
                trial[c] = round(trial[c] + d, 4)
                s = score(trial)
                if s > current + 1e-6:
                    offsets, current, improved = trial, s, True
    zero = [0.0] * N_CLASSES
    record = {"phantoms": {s.name: {"pixels": int(s.truth.size),
                                    "dice_argmax": [round(float(v), 4) for v in mean_dice(s, zero)],
                                    "dice": [round(float(v), 4) for v in mean_dice(s, offsets)]}
                           for s in samples},
              "mean_dice_argmax": round(score(zero), 4), "mean_dice": round(current, 4)}
    return [float(v) for v in offsets], record


def train_decision(stores: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   every: int = 1, segmenter: str | os.PathLike | None = None,
                   command: str = "", log: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Fit the decision of ``segmenter`` (default: the shipped ensemble) on ``stores`` and write
    the ensemble, its weights unchanged, with the decision in its card, to ``out`` (and its
    ``.json``). Returns the card's ``decision``."""
    seg_path = Path(segmenter) if segmenter is not None else DEFAULT_SEGMENTER
    out = Path(out)
    if out.resolve() == seg_path.resolve():
        raise VolrefError(f"--out {out} is the ensemble the decision is fitted for: write the "
                          "decided ensemble to another file (the original stays as it is)")
    settings = SegmentSettings(precision="fp32")
    tensors, meta = load_tensors(seg_path)
    card = dict(meta.get("card") or {})
    card.pop("decision", None)  # fitted on the ensemble's own probabilities, not a previous fit
    ensemble = load_segmenter(seg_path)  # its probabilities: any earlier decision plays no part
    samples = [decision_sample(s, every, ensemble, seg_path, settings, log) for s in stores]
    offsets, record = fit_offsets(samples)
    decision = {"offsets": [round(v, 4) for v in offsets], "volref": __version__,
                "segmenter_sha256": file_hash(seg_path), "data": [s.name for s in samples],
                "every": every, "fit": record, "command": command}
    meta = {**meta, "card": {**card, "decision": decision}}
    save_tensors(out, tensors, meta)
    import json

    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return decision
