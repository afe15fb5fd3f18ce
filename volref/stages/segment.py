"""Ensemble segmentation of a block: labels and normalised entropy, slice by slice.

Each z-slice is predicted from three slices (the 2.5-D input) on a global x/y tile grid: tiles
of ``tile`` pixels, each read with ``halo`` pixels of context on every side, so a pixel's result
depends only on the volume and the grid — not on how the volume was cut into blocks::

      halo ┌──────────────────┐
           │  ┌────────────┐  │   network input: tile + 2 halo
           │  │ tile (kept) │  │   output kept:   the tile
           │  └────────────┘  │
           └──────────────────┘

The caller passes the block with one extra slice above and below (z halo 1) where the volume has
them, and with the x/y halo already read from the neighbouring data; at the volume's edges the
input is mirrored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from volref.models.ensemble import Ensemble
from volref.models.precision import DTYPES, in_order, in_precision, lanes_for, resolve
from volref.stages.settings import SegmentSettings  # noqa: F401 - its home is stages.settings


def segment_slices(ensemble: Ensemble, stack: np.ndarray, settings: SegmentSettings,
                   device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Predict the middle slices of ``stack``.

    Parameters
    ----------
    stack
        ``(nz + 2, Y + 2*halo, X + 2*halo)`` normalised float32: the block with one slice of z
        context on each side and ``halo`` pixels of x/y context (mirrored at volume edges).

    Returns
    -------
    labels ``(nz, Y, X)`` uint8 and uncertainty ``(nz, Y, X)`` float32 in [0, 1].
    """
    def predict(net: Ensemble, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab, unc = net.predict(x)  # probabilities stay on the device
        return lab, unc.float()

    labels, uncertainty = _tiled(ensemble, stack, settings, device, predict,
                                 ((), np.uint8), ((), np.float32))
    return labels, uncertainty


def segment_probabilities(ensemble: Ensemble, stack: np.ndarray, settings: SegmentSettings,
                          device: str | torch.device = "cpu",
                          needed: np.ndarray | None = None) -> np.ndarray:
    """The ensemble's mean class probabilities ``(nz, C, Y, X)`` float32 of the middle slices of
    ``stack`` (as :func:`segment_slices`, whose labels are their argmax): for the baselines that
    need them (the dense CRF, the fused refinement), not for the segment stage.

    ``needed``: ``(nz, tiles in y, tiles in x)`` bool, the tiles of the grid to compute (the
    others stay 0); None: all. A tile's values do not depend on which others run."""
    def predict(net: Ensemble, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (net.mean_probabilities(x).float(),)

    (probabilities,) = _tiled(ensemble, stack, settings, device, predict,
                              ((ensemble.n_classes,), np.float32), needed=needed)
    return probabilities


def _tiled(ensemble: Ensemble, stack: np.ndarray, settings: SegmentSettings,
           device: str | torch.device,
           predict: Callable[[Any, torch.Tensor], tuple[torch.Tensor, ...]],
           *outputs: tuple[tuple[int, ...], type], needed: np.ndarray | None = None
           ) -> list[np.ndarray]:
    """Run ``predict(net, windows) -> tensors (N, *lead, w, w)`` over the global tile grid of
    the middle slices of ``stack``; ``outputs`` gives each result's leading shape and dtype."""
    t, h = settings.tile, settings.halo
    nz = stack.shape[0] - 2
    ny, nx = stack.shape[1] - 2 * h, stack.shape[2] - 2 * h
    s = ensemble.config.in_slices
    if s != 3:
        raise ValueError(f"segment_slices expects a 3-slice network, got {s}")
    m = ensemble.config.multiple
    if (t + 2 * h) % m:
        raise ValueError(f"tile + 2*halo must be a multiple of {m}")
    results = [np.zeros((nz,) + lead + (ny, nx), dtype=dtype) for lead, dtype in outputs]
    dev = torch.device(device)
    precision = resolve(settings.precision, dev)
    net = in_precision(ensemble, precision)
    dtype = DTYPES[precision]
    w = t + 2 * h
    places = [(z, y0, x0) for z in range(nz) for y0 in range(0, ny, t) for x0 in range(0, nx, t)
              if needed is None or needed[z, y0 // t, x0 // t]]

    @torch.no_grad()  # grad mode is per thread: in_order's threads need it too
    def run(part: list[tuple[int, int, int]]) -> list[np.ndarray]:
        windows = np.zeros((settings.batch, 3, w, w), dtype=np.float32)
        for k, (z, y0, x0) in enumerate(part):
            win = stack[z:z + 3, y0:y0 + w, x0:x0 + w]
            if win.shape[1:] != (w, w):  # the last tiles: pad by mirroring
                win = np.pad(win, ((0, 0), (0, w - win.shape[1]), (0, w - win.shape[2])),
                             mode="symmetric")
            windows[k] = win
        tensors = predict(net, torch.from_numpy(windows).to(dev, dtype))
        return [tensor[:len(part), ..., h:h + t, h:h + t].cpu().numpy() for tensor in tensors]

    # batches run across slices (a small block fills them too); every forward pass has the same
    # shape (the last batch padded with zeros) and runs on one thread (in_order), so a tile's
    # result never depends on which other tiles share its batch or on the process's threads
    batches = [places[i:i + settings.batch] for i in range(0, len(places), settings.batch)]
    for part, arrays in zip(batches, in_order(run, batches, lanes_for(dev))):
        for out, arr in zip(results, arrays):
            for (z, y0, x0), a in zip(part, arr):
                ys, xs = min(t, ny - y0), min(t, nx - x0)
                out[z, ..., y0:y0 + ys, x0:x0 + xs] = a[..., :ys, :xs]
    return results


def uncertainty_to_uint8(u: np.ndarray) -> np.ndarray:
    """Stored form of the normalised entropy: round(255 u) (resolution 0.004)."""
    q: np.ndarray = np.rint(np.clip(u, 0.0, 1.0) * 255.0).astype(np.uint8)
    return q


def uncertainty_from_uint8(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / np.float32(255.0)
