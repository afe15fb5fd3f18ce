"""Training data from OME-Zarr volumes: image, annotations, and where the stain was weak.

Annotations of real pan-ExM data are ambiguous exactly where the stain is weak: one annotator
draws the cristae they guess, another leaves the area as background, a third paints the whole
mitochondrion as matrix. :func:`annotator_labels` simulates that inside the phantom's degraded
areas, differently for every ensemble member, which is what lets the members disagree there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.errors import VolrefError
from volref.io import Volume as ImageVolume
from volref.io import background_sample, label_names, open_image
from volref.io.inputs import InputNotFound, find_image, find_label_image
from volref.io.ngff import read_multiscale
from volref.layout import DEGRADED, GROUND_TRUTH, INITIAL, UNCERTAINTY_PATH
from volref.stages.labels import check_fits, check_uncertainty, to_classes, to_uncertainty
from volref.stages.normalise import (
    PHANTOM_SCALE,
    IntensityRange,
    background_of,
    normalise,
    range_for,
)
from volref.stages.settings import LabelSettings

log = logging.getLogger(__name__)

IGNORE = 255  # label value left out of every loss


@dataclass
class Volume:
    """A training volume in memory: normalised image, classes, degraded mask (all z, y, x)."""

    name: str
    image: np.ndarray  # float32, normalised
    classes: np.ndarray  # uint8
    degraded: np.ndarray  # bool
    intensity: IntensityRange


def load_volume(location: str | os.PathLike, labels: str = GROUND_TRUTH,
                degraded: str | None = DEGRADED) -> Volume:
    """Load an image and its label images fully into memory (training volumes are small)."""
    vol = open_image(location)
    names = label_names(vol.group)
    if labels not in names:
        raise VolrefError(f"{vol.location} has no label image {labels!r} (has: {', '.join(names) or 'none'})")
    rng = training_range(vol)
    image = normalise(np.asarray(vol.data.compute()), rng)

    def read(name: str) -> np.ndarray:
        group = vol.group["labels"][name]
        ms = read_multiscale(group, where=f"labels/{name}")
        lead = (0,) * (ms.ndim - 3)
        return np.asarray(group[ms.levels[0].path][lead])

    classes = read(labels)
    deg = read(degraded).astype(bool) if degraded and degraded in names else np.zeros(
        classes.shape, dtype=bool)
    return Volume(name=str(location), image=image, classes=classes, degraded=deg, intensity=rng)


def annotator_labels(classes: np.ndarray, degraded: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Labels as one annotator would draw them: unchanged where the stain is clear; in degraded
    areas one of: as truth (30 %), nothing seen (25 %), a blob of matrix (25 %), no cristae (20 %).
    """
    if not degraded.any():
        return classes
    out = classes.copy()
    choice = rng.choice(4, p=[0.30, 0.25, 0.25, 0.20])
    d = degraded
    if choice == 1:
        out[d] = BACKGROUND
    elif choice == 2:
        out[d & (classes != BACKGROUND)] = MATRIX
    elif choice == 3:
        out[d & (classes == CRISTAE)] = MATRIX
    return out


def slice_stack(image: np.ndarray, z: int, n: int = 3) -> np.ndarray:
    """The ``n`` slices centred on ``z`` (edges repeated): the 2.5-D network input."""
    half = n // 2
    idx = np.clip(np.arange(z - half, z + half + 1), 0, image.shape[0] - 1)
    return image[idx]


@dataclass(frozen=True)
class IntensityJitter:
    """How far a training crop's intensities are moved from the volume's mapping, in units of the
    model card's scale (background at ``PHANTOM_SCALE.background``, one noise sigma
    ``PHANTOM_SCALE.noise`` wide): what differs between acquisitions after the background mapping
    has taken out gain and offset.

    Attributes
    ----------
    contrast
        Range of the factor on the stain's distance from the background (how bright mitochondria
        are against the cytosol, which the mapping does not fix).
    noise
        Up to this many extra noise sigmas (Gaussian) are added to half the crops.
    offset
        Sigma, in noise sigmas, of a shift of the whole crop (the background estimate's error).
    slice_gain
        Sigma of an independent gain on each input slice about the background (thin or bleaching
        stacks step in brightness from slice to slice).
    """

    contrast: tuple[float, float] = (0.7, 1.4)
    noise: float = 1.0
    offset: float = 0.5
    slice_gain: float = 0.06

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``x`` ``(slices, y, x)`` jittered (a new float32 array); draws a fixed number of values
        from ``rng`` per call, so the crops after it do not depend on their content."""
        bg, sigma = PHANTOM_SCALE.background, PHANTOM_SCALE.noise
        c = rng.uniform(*self.contrast)
        gains = 1.0 + self.slice_gain * rng.standard_normal(x.shape[0])
        shift = self.offset * sigma * rng.standard_normal()
        extra = self.noise * sigma * rng.random() if rng.random() < 0.5 else 0.0
        per_slice = np.asarray(c * gains, dtype=np.float64)
        out = bg + (x - bg) * per_slice[:, None, None] + shift
        if extra > 0:
            out = out + extra * rng.standard_normal(x.shape)
        return out.astype(np.float32)


def sample_crops(volumes: list[Volume], n: int, size: int, rng: np.random.Generator,
                 in_slices: int = 3, ambiguity: bool = True,
                 jitter: IntensityJitter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random crops: inputs ``(n, in_slices, size, size)``, labels ``(n, size, size)``.

    Crops are drawn with a bias toward mitochondria (half the crops are centred on one), flipped
    and rotated at random, labelled by a simulated annotator (if ``ambiguity``) and, with
    ``jitter``, given another acquisition's contrast, noise and slice-to-slice brightness.
    """
    xs = np.empty((n, in_slices, size, size), dtype=np.float32)
    ys = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        v = volumes[rng.integers(len(volumes))]
        nz, ny, nx = v.classes.shape
        if ny < size or nx < size:
            raise VolrefError(f"{v.name}: slices {ny}x{nx} are smaller than the crop size {size}")
        z = int(rng.integers(nz))
        if rng.random() < 0.5:
            fg = np.flatnonzero(v.classes[z].ravel() != BACKGROUND)
            if len(fg):
                c = fg[rng.integers(len(fg))]
                cy, cx = divmod(int(c), nx)
                y0 = int(np.clip(cy - size // 2, 0, ny - size))
                x0 = int(np.clip(cx - size // 2, 0, nx - size))
            else:
                y0, x0 = int(rng.integers(ny - size + 1)), int(rng.integers(nx - size + 1))
        else:
            y0, x0 = int(rng.integers(ny - size + 1)), int(rng.integers(nx - size + 1))
        x = slice_stack(v.image, z, in_slices)[:, y0:y0 + size, x0:x0 + size]
        y = v.classes[z, y0:y0 + size, x0:x0 + size]
        if ambiguity:
            y = annotator_labels(y, v.degraded[z, y0:y0 + size, x0:x0 + size], rng)
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if flip:
            x, y = x[:, :, ::-1], y[:, ::-1]
        xs[i], ys[i] = (x if jitter is None else jitter.apply(x, rng)), y
    return xs, ys


__all__ = ["IGNORE", "IMS", "IntensityJitter", "Volume", "annotator_labels", "load_volume", "sample_crops",
           "slice_stack"]


def training_range(vol: ImageVolume) -> IntensityRange:
    """The range a training volume is normalised with: its background level and noise mapped by
    :data:`~volref.stages.normalise.PHANTOM_SCALE`, the scale the trainers write into their
    model cards (so ``volref segment`` maps a user's volume the same way)."""
    rng = range_for(background_of(background_sample(vol)), PHANTOM_SCALE)
    if rng is None:
        raise VolrefError(f"{vol.location}: the image shows no noise to normalise by")
    return rng


def load_image(location: str | os.PathLike) -> np.ndarray:
    """The image ``(z, y, x)`` normalised as ``volref segment`` normalises it with the shipped
    ensemble (MAE+X input)."""
    vol = open_image(location)
    return normalise(np.asarray(vol.data.compute()), training_range(vol))


def load_predictions(location: str | os.PathLike,
                     inputs: LabelSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels (volref's classes, uint8) and uncertainty (float32 in [0, 1]) to train a refiner on.

    By default the ensemble's, as ``volref segment`` wrote them; with ``inputs.labels`` a label
    image of the archive written by any tool, mapped by ``inputs.class_map``, with the
    uncertainty at ``inputs.uncertainty`` (entropy or per-class probabilities) or the ensemble's
    (:mod:`volref.stages.labels`, as ``volref refine --labels`` reads them).
    """
    inputs = inputs or LabelSettings()
    vol = open_image(location)
    stores = [(vol.group, vol.location)]
    if inputs.labels is None:
        if INITIAL not in label_names(vol.group):
            raise VolrefError(f"{vol.location} has no label image {INITIAL!r}: run volref "
                              "segment first, or name your own with --labels")
        found = find_label_image(stores, INITIAL, vol.shape)
        lab = np.asarray(found.array[found.lead])
    else:
        found = find_label_image(stores, inputs.labels, vol.shape)
        check_fits(inputs.table, found.array.dtype, found.where)
        lab = to_classes(np.asarray(found.array[found.lead]), inputs.table, found.where)
    if inputs.uncertainty is not None:
        given = find_image(stores, inputs.uncertainty, vol.shape)
        raw = np.asarray(given.array[given.lead])
        check_uncertainty(raw, given.where, given.channel_axis is not None)
        return lab, to_uncertainty(raw, given.channel_axis)
    try:
        given = find_image(stores, UNCERTAINTY_PATH, vol.shape)
    except InputNotFound:
        raise VolrefError(f"{vol.location} has no {UNCERTAINTY_PATH}: run volref segment "
                          f"{vol.location} first, or give the labels' own with --uncertainty"
                          ) from None
    return lab, to_uncertainty(np.asarray(given.array[given.lead]))
