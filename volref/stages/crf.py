"""The dense-CRF baseline (Krähenbühl & Koltun 2011): a fully connected CRF with Gaussian edge
potentials over a slice, mean-field inference, on the ensemble's class probabilities and the
image.

Energy of a labelling ``x``: ``sum_i -log p_i(x_i) + sum_{i<j} mu(x_i, x_j) k(f_i, f_j)`` with the
Potts compatibility ``mu`` and two kernels: a smoothness kernel on positions
(``exp(-|p_i - p_j|^2 / 2 sxy^2)``) and an appearance kernel on positions and intensities
(``exp(-|p_i - p_j|^2 / 2 bxy^2 - |I_i - I_j|^2 / 2 bi^2)``). Inference is the permutohedral-lattice
mean field of the authors' own C++ code, through ``pydensecrf2`` (the maintained build of
pydensecrf that installs from PyPI and compiles on Python 3.11; about 30 ms for a 4-class
128x128 tile with 5 iterations). The CRF relabels every pixel it is given — it has no notion of
"uncertain patches" — so, like the paper's baseline, it sees the whole tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volref.errors import SettingsError
from volref.settings import Settings


@dataclass(frozen=True)
class CRFSettings(Settings):
    """Kernel parameters. The weights were chosen on a validation phantom (seed 500, neither a
    training nor a held-out seed) by ``experiments.crf_tuning``: mean per-class Dice inside
    degraded regions over a grid of smoothness weight {1, 3} x appearance weight {0, 3, 10} x
    intensity scale {8, 24, 64}; the best setting that still uses the image is kept (0.409;
    without the appearance kernel 0.430; the ensemble's own labels 0.436)."""

    iterations: int = 5
    smooth_sxy: float = 3.0  # pixels
    smooth_weight: float = 1.0
    appearance_sxy: float = 12.0  # pixels
    appearance_intensity: float = 64.0  # grey levels of the image mapped to 0..255
    appearance_weight: float = 3.0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise SettingsError("iterations", "the CRF needs at least one mean-field iteration")
        for name in ("smooth_sxy", "appearance_sxy", "appearance_intensity"):
            if getattr(self, name) <= 0:
                raise SettingsError(name, f"{name} must be > 0")


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """A normalised image (``[0, 1]`` between the volume's robust percentiles) as 0..255 grey."""
    grey: np.ndarray = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return grey


def crf_probabilities(probabilities: np.ndarray, image: np.ndarray,
                      settings: CRFSettings = CRFSettings()) -> np.ndarray:
    """Mean-field marginals ``(C, H, W)`` float32 of the dense CRF.

    ``probabilities``: ``(C, H, W)`` class probabilities (the ensemble's mean); ``image``:
    ``(H, W)`` normalised intensities.
    """
    import pydensecrf.densecrf as dcrf  # compiled extension: imported where it is used

    c, h, w = probabilities.shape
    if image.shape != (h, w):
        raise ValueError(f"image {image.shape} and probabilities {probabilities.shape} differ")
    p = np.clip(probabilities.astype(np.float32), 1e-6, 1.0)
    unary = np.ascontiguousarray(-np.log(p).reshape(c, h * w))
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=settings.smooth_sxy, compat=settings.smooth_weight)
    grey = np.ascontiguousarray(np.repeat(image_to_uint8(image)[..., None], 3, axis=-1))
    crf.addPairwiseBilateral(sxy=settings.appearance_sxy, srgb=settings.appearance_intensity,
                             rgbim=grey, compat=settings.appearance_weight)
    q = np.asarray(crf.inference(settings.iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def crf_labels(probabilities: np.ndarray, image: np.ndarray,
               settings: CRFSettings = CRFSettings()) -> np.ndarray:
    """The CRF's labelling ``(H, W)`` uint8 (argmax of its marginals)."""
    labels: np.ndarray = crf_probabilities(probabilities, image, settings).argmax(axis=0)
    return labels.astype(np.uint8)


def crf_region(probabilities: np.ndarray, image: np.ndarray, labels: np.ndarray,
               uncertainty: np.ndarray, *, tile: int, margin: int, tau: float, near_px: float,
               settings: CRFSettings = CRFSettings(), patch: int = 4) -> np.ndarray:
    """``volref refine --method crf`` on the core of a region of slices.

    All inputs cover the core plus ``margin`` pixels on every side (``probabilities``
    ``(nz, C, H, W)``, the rest ``(nz, H, W)``); the core starts on the global ``tile`` grid. Each
    tile of the core that holds a removed patch (the MAE's rule: mean uncertainty > ``tau``, near
    a mitochondrion) is relabelled wholly by the CRF run on the tile plus ``margin`` — a pixel's
    result depends on its tile's window alone, so any cut of the volume gives the same bytes —
    and the other tiles keep their labels. Returns the core's labels ``(nz, H - 2m, W - 2m)``.
    """
    from volref.stages.refine import removal_mask

    m = margin
    nz, h, w = labels.shape
    ny, nx = h - 2 * m, w - 2 * m
    if m % patch or m < near_px + patch:
        raise ValueError(f"margin {m} must be a multiple of {patch} and reach past the "
                         f"near-mitochondrion test ({near_px} px + a patch)")
    out = labels[:, m:m + ny, m:m + nx].copy()
    for z in range(nz):
        for y in range(0, ny, tile):
            for x in range(0, nx, tile):
                th, tw = min(tile, ny - y), min(tile, nx - x)
                win = (slice(y, y + th + 2 * m), slice(x, x + tw + 2 * m))
                lab, unc = labels[z][win], uncertainty[z][win]
                hp, wp = lab.shape[0] // patch * patch, lab.shape[1] // patch * patch
                removed = removal_mask(lab[:hp, :wp], unc[:hp, :wp], patch, tau, near_px)
                core = removed[m // patch:(m + th) // patch, m // patch:(m + tw) // patch]
                if not core.any():
                    continue
                new = crf_labels(probabilities[z][(slice(None),) + win], image[z][win], settings)
                out[z, y:y + th, x:x + tw] = new[m:m + th, m:m + tw]
    return out
