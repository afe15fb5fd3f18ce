"""Intensity normalisation shared by training and inference.

One range per volume, from robust percentiles of a sample of its coarsest pyramid level (see
:func:`volref.io.intensity_sample`), so every block of a volume is normalised identically
whatever the blocking. The range is recorded in provenance with the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.8


@dataclass(frozen=True)
class IntensityRange:
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


def range_of(sample: np.ndarray) -> IntensityRange:
    """Robust intensity range of a sample (finite values only)."""
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return IntensityRange(0.0, 1.0)
    lo, hi = np.percentile(finite, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        hi = lo + 1.0
    return IntensityRange(float(lo), float(hi))


def normalise(block: np.ndarray, r: IntensityRange) -> np.ndarray:
    """Map ``[low, high]`` to ``[0, 1]`` (values outside kept, as float32)."""
    scale = np.float32(1.0 / (r.high - r.low))
    return (block.astype(np.float32) - np.float32(r.low)) * scale
