"""Fitting the fused refinement's :class:`~volref.models.fusion.Fusion` on phantoms with ground
truth: the ensemble's and the refiner's probabilities at the pixels the refiner rebuilds, and the
true class there (:func:`fit_fusion`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volref import __version__
from volref.classes import BACKGROUND, N_CLASSES
from volref.errors import VolrefError
from volref.evaluate.table2 import Table2Settings, load_slices
from volref.models.fusion import FLOOR, RIM, SMOOTH, Fusion, features, save_fusion
from volref.models.mae import MaskedAutoencoder
from volref.models.precision import in_precision
from volref.models.registry import (
    DEFAULT_REFINER,
    DEFAULT_SEGMENTER,
    file_hash,
    load_refiner,
    load_segmenter,
)
from volref.stages.refine import context, refine_region
from volref.stages.settings import RefineSettings


def fit_fusion(ensemble: Sequence[np.ndarray], refiner: Sequence[np.ndarray],
               truth: Sequence[np.ndarray], n_classes: int, balance: float = 0.5,
               l2: float = 1e-3, floor: float = FLOOR) -> tuple[Fusion, dict[str, Any]]:
    """Fit a :class:`Fusion` by weighted cross-entropy (L-BFGS, float64) on pixels with ground
    truth: per sample ``(C, n)`` probabilities of both models and ``(n,)`` true classes.

    ``balance``: class weights ``(N / (C * N_c)) ** balance`` (0: none; 1: every class counts
    as much): rare classes (cristae) otherwise lose every close call. ``l2`` keeps the refiner's
    weights small where the data say little. Starts from the ensemble's own argmax. Returns the
    fusion and a record of the fit (pixels per class, loss before and after)."""
    x = torch.from_numpy(np.stack(features(np.concatenate(list(ensemble), axis=1),
                                           np.concatenate(list(refiner), axis=1), floor), axis=1))
    y = torch.from_numpy(np.concatenate(list(truth)).astype(np.int64))
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"fit_fusion needs the same number (> 0) of pixels in each input, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    counts = torch.bincount(y, minlength=n_classes).double()
    cw = (counts.sum() / (n_classes * counts.clamp(min=1))) ** balance
    start = Fusion.identity(n_classes)
    w = torch.tensor(start.weights, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        return (torch.nn.functional.cross_entropy(x @ w + b, y, weight=cw)
                + l2 * (w[n_classes:] ** 2).sum())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(loss_fn())
    opt.step(closure)
    with torch.no_grad():
        after = float(loss_fn())
    fusion = Fusion(tuple(tuple(float(v) for v in r) for r in w.detach().tolist()),
                    tuple(float(v) for v in b.detach().tolist()), floor)
    return fusion, {"pixels": [int(v) for v in counts.tolist()], "balance": balance, "l2": l2,
                    "loss_start": before, "loss": after}


@dataclass
class FusionSample:
    """The rebuilt pixels of one z-slice: both models' probabilities ``(C, n)`` and the truth."""

    ensemble: np.ndarray
    refiner: np.ndarray
    truth: np.ndarray


def rebuilt_probabilities(refiner: MaskedAutoencoder, initial: np.ndarray, uncertainty: np.ndarray,
                          settings: RefineSettings) -> tuple[np.ndarray, np.ndarray]:
    """The refiner run over a whole slice ``(Y, X)`` as ``volref refine`` runs it (background and
    zero uncertainty past the slice): the mask of the pixels it rebuilds and their ``(C, n)``
    probabilities."""
    c = context(settings, refiner.config.patch)
    got: list[tuple[np.ndarray, np.ndarray]] = []

    def keep(z: int, sel: np.ndarray, p: np.ndarray) -> np.ndarray:
        got.append((sel.copy(), p.copy()))
        return p.argmax(axis=0)

    refine_region(refiner, np.pad(initial, c, constant_values=BACKGROUND)[None],
                  np.pad(uncertainty, c, constant_values=0.0)[None], settings, combine=keep)
    if not got:
        return np.zeros(initial.shape, bool), np.zeros((N_CLASSES, 0), np.float32)
    return got[0]


def fusion_samples(store: str | os.PathLike, every: int, ensemble: nn.Module,
                   refiner: MaskedAutoencoder,
                   settings: RefineSettings, log: Callable[[str], None] | None = None
                   ) -> list[FusionSample]:
    """Every ``every``-th slice of a segmented phantom with ground truth (``volref synth``, then
    ``volref segment``): the pixels the refiner rebuilds, with both models' probabilities."""
    out = []
    for s in load_slices(store, Table2Settings(every=every), ensemble=ensemble):
        sel, p = rebuilt_probabilities(refiner, s.initial, s.uncertainty, settings)
        if s.probabilities is None:  # load_slices sets it when given the ensemble
            raise RuntimeError("load_slices gave no ensemble probabilities")
        out.append(FusionSample(s.probabilities()[:, sel], p, s.truth[sel]))
        if log is not None:
            log(f"{store}: slice {s.z}, {int(sel.sum())} rebuilt pixels")
    return out


def train_fusion(stores: Sequence[str | os.PathLike], out: str | os.PathLike, *, every: int = 2,
                 balance: float = 0.5, l2: float = 1e-3, segmenter: str | os.PathLike | None = None,
                 refiner: str | os.PathLike | None = None, command: str = "",
                 log: Callable[[str], None] | None = None, smooth: float = SMOOTH,
                 rim: bool = RIM) -> tuple[Fusion, dict[str, Any]]:
    """Fit a fusion of ``segmenter``'s and ``refiner``'s probabilities (default: the shipped
    ones) on ``stores`` and write it, with a card naming both models' hashes, to ``out``.
    ``smooth``, ``rim``: how it draws the outline (:class:`~volref.models.fusion.Fusion`; the
    fit itself is on the unsmoothed probabilities)."""
    try:  # refuse bad outline settings before minutes of fitting
        dataclasses.replace(Fusion.identity(N_CLASSES), smooth=smooth, rim=rim)
    except ValueError as exc:
        raise VolrefError(str(exc)) from None
    settings = RefineSettings()
    seg_path = Path(segmenter) if segmenter is not None else DEFAULT_SEGMENTER
    ref_path = Path(refiner) if refiner is not None else DEFAULT_REFINER
    ens = load_segmenter(seg_path)
    mae = in_precision(load_refiner(ref_path), settings.precision)
    if not isinstance(mae, MaskedAutoencoder) or mae.needs_image:
        raise VolrefError(f"{ref_path} is not a MAE: the fusion combines the MAE's probabilities")
    samples = [s for st in stores for s in fusion_samples(st, every, ens, mae, settings, log)]
    if not any(s.truth.size for s in samples):
        raise VolrefError("no pixel of these phantoms was rebuilt: nothing to fit a fusion on "
                          "(use phantoms with degraded areas, volref synth --degraded-fraction)")
    fusion, record = fit_fusion([s.ensemble for s in samples], [s.refiner for s in samples],
                                [s.truth for s in samples], N_CLASSES, balance=balance, l2=l2)
    fusion = dataclasses.replace(fusion, smooth=smooth, rim=rim)
    card = {"volref": __version__, "segmenter_sha256": file_hash(seg_path),
            "refiner_sha256": file_hash(ref_path), "data": [Path(s).name for s in stores],
            "every": every, "refine": settings.to_dict(), "fit": record, "command": command}
    save_fusion(out, fusion, card)
    return fusion, card
