"""Intensity normalisation shared by training and inference.

A model sees intensities on the scale it was trained for. The shipped ensemble was trained on
phantoms whose range was stretched to each volume's own 1-99.8 % percentiles; that stretch
depends on how much of the volume is mitochondrion (an empty volume's 99.8th percentile is
bright background noise, which the stretch then presents as stain). The default mapping here
takes two levels that do not depend on how much stain there is:

* ``level``: the background's median, from the voxels between ``level - 3 sigma`` and
  ``level + 1.5 sigma`` (iterated; mitochondria add mostly bright voxels, so the window is
  asymmetric) — within 1.5 ADU of the background-only median on phantoms with 0-24 %
  mitochondrion;
* ``stain``: how bright the stain is — the 90th percentile of the voxels clearly above the
  background (``level + 5 sigma``), whatever their number, as long as they are at least 0.1 %
  of the sample;

and maps them where the model card's :class:`IntensityScale` says (their normalised values on
the training phantoms under the percentile mapping the ensemble was trained with, so typical
volumes see the same numbers as before). A volume without stain (an empty one) has no
``stain`` level: the per-voxel ``noise`` (from differences of x-neighbours among background
voxels, ``1.4826 MAD / sqrt 2``: shading, bleaching and texture cancel) sets the width instead,
so its background noise is never stretched into stain. Both ways are affine-equivariant: a gain
or an offset of the image moves ``level``, ``stain`` and ``noise`` with it. The noise alone is
not the default width: a noisier acquisition would then look fainter to the model (twice the
noise: clean-region Dice 0.45 instead of 0.79 on a validation phantom).

One range per volume, computed once from a sample of the level being processed (see
:func:`volref.io.background_sample`, placed by the volume's shape alone), so every block of a
volume is normalised identically whatever the blocking, and the same image stored in other
chunks gets the same range. The range is recorded with the outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.8
MAD_SIGMA = 1.4826  # sigma of a normal distribution per median absolute deviation
CLIP_LOW, CLIP_HIGH, CLIP_ROUNDS = 3.0, 1.5, 8
#: stain: voxels above ``level + STAIN_SIGMAS x max(spread, noise)``, their STAIN_PERCENTILE-th
#: percentile, when they are at least STAIN_MIN_SHARE of the sample (chosen on validation
#: phantoms, seeds 3 and 11)
STAIN_SIGMAS, STAIN_PERCENTILE, STAIN_MIN_SHARE = 5.0, 90.0, 1e-3


@dataclass(frozen=True)
class IntensityRange:
    """Intensities ``low`` and ``high`` map to 0 and 1 (the model's scale)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


@dataclass(frozen=True)
class IntensityScale:
    """Where a model expects the background: stored in its model card under ``intensity``.

    Attributes
    ----------
    background
        Normalised value of the background level.
    noise
        Normalised width of one sigma of the background's per-voxel noise (the width of a
        volume without stain, or of any volume when ``stain`` is None).
    stain
        Normalised value of the stain level (see the module doc); None in cards made before it.
    """

    background: float
    noise: float
    stain: float | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.background) and np.isfinite(self.noise) and self.noise > 0):
            raise ValueError(f"intensity scale needs a finite background and a noise > 0, "
                             f"got {self.background}, {self.noise}")
        if self.stain is not None and not (np.isfinite(self.stain)
                                           and self.stain > self.background):
            raise ValueError(f"intensity scale needs a finite stain above the background, "
                             f"got {self.stain}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": "background", "background": self.background,
                               "noise": self.noise}
        if self.stain is not None:
            out["stain"] = self.stain
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityScale:
        if data.get("method", "background") != "background":
            raise ValueError(f"unknown intensity method {data.get('method')!r}")
        stain = data.get("stain")
        return cls(background=float(data["background"]), noise=float(data["noise"]),
                   stain=None if stain is None else float(stain))


#: The scale of the shipped ensemble, measured on its training phantoms against the percentile
#: mapping it was trained with (``python -m benchmarks.intensity_scale``); ``volref train
#: segmenter`` normalises with it and writes it into the cards it makes.
PHANTOM_SCALE = IntensityScale(background=0.1125, noise=0.0889, stain=0.9191)


@dataclass(frozen=True)
class Background:
    """Robust background statistics of an image sample (in the image's units)."""

    level: float
    spread: float  # sigma of the background's intensities (shading and texture included)
    noise: float  # sigma of its per-voxel noise
    stain: float | None = None  # how bright the stain is (module doc); None: no stain seen

    def to_dict(self) -> dict[str, float | None]:
        return {"level": self.level, "spread": self.spread, "noise": self.noise,
                "stain": self.stain}


def range_of(sample: np.ndarray) -> IntensityRange:
    """Robust percentile range of a sample (finite values only): the mapping of checkpoints
    whose card holds no intensity scale."""
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return IntensityRange(0.0, 1.0)
    lo, hi = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        hi = lo + 1.0
    return IntensityRange(float(lo), float(hi))


def _median_sigma(x: np.ndarray) -> tuple[float, float]:
    m = float(np.median(x))
    return m, MAD_SIGMA * float(np.median(np.abs(x - m)))


def background_of(blocks: Sequence[np.ndarray]) -> Background:
    """Background level, spread and per-voxel noise of image blocks ``(z, y, x)``.

    Raises ``ValueError`` when the blocks hold no finite value.
    """
    values = np.concatenate([np.asarray(b, dtype=np.float64).ravel() for b in blocks])
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite intensity in the sample")
    level, spread = _median_sigma(values)
    for _ in range(CLIP_ROUNDS):
        if spread <= 0:
            break
        kept = values[(values > level - CLIP_LOW * spread) & (values < level + CLIP_HIGH * spread)]
        if kept.size == 0:
            break
        level, spread = _median_sigma(kept)
    diffs = []
    for b in blocks:
        b = np.asarray(b, dtype=np.float64)
        d = b[..., 1:] - b[..., :-1]
        centre = 0.5 * (b[..., 1:] + b[..., :-1])
        keep = np.isfinite(d) & (centre > level - CLIP_LOW * spread) & (
            centre < level + CLIP_HIGH * spread)
        diffs.append(d[keep])
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    noise = _median_sigma(d)[1] / np.sqrt(2.0) if d.size else 0.0
    stain = None
    sigma = max(spread, noise)
    if sigma > 0:
        above = values[values > level + STAIN_SIGMAS * sigma]
        if above.size >= STAIN_MIN_SHARE * values.size:
            stain = float(np.percentile(above, STAIN_PERCENTILE))
    return Background(level=level, spread=spread, noise=float(noise), stain=stain)


def range_for(background: Background, scale: IntensityScale) -> IntensityRange | None:
    """The range that puts the background and the stain where ``scale`` says the model expects
    them (the noise sets the width when the sample shows no stain, or the card knows no stain
    level); None when the sample shows no noise to measure by (a constant or noise-free image)."""
    if scale.stain is not None and background.stain is not None:
        width = (background.stain - background.level) / (scale.stain - scale.background)
    elif background.noise > 0:
        width = background.noise / scale.noise
    else:
        return None
    low = background.level - scale.background * width
    return IntensityRange(float(low), float(low + width))


def normalise(block: np.ndarray, r: IntensityRange) -> np.ndarray:
    """Map ``[low, high]`` to ``[0, 1]`` (values outside kept, as float32)."""
    scale = np.float32(1.0 / (r.high - r.low))
    return (block.astype(np.float32) - np.float32(r.low)) * scale
