"""The one intensity range of a volume, chosen once before any block is segmented.

In order of precedence:

1. ``--intensity-range LO HI``: the user's numbers, mapped to the model's 0 and 1;
2. ``--intensity-window``: the image's ``omero`` display window, likewise. Not the default: a
   display window is chosen for viewing (or set to the data's minimum and maximum by the
   writer), which is the content-dependent stretch the default avoids; phantoms written by
   ``volref synth`` have none;
3. the model card's ``intensity`` scale with the background and stain levels (or the noise) of
   a sample of the volume (:mod:`volref.stages.normalise`) — the default for the shipped
   ensemble;
4. a checkpoint whose card has no scale was trained on percentile-stretched volumes: it gets
   the 1-99.8 % percentiles of the coarsest level, as it was trained.

The range depends on the volume and the settings alone, never on the block cut.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np

from volref.errors import ConfigError
from volref.io import Volume, background_sample, display_window, intensity_sample
from volref.models.registry import model_card
from volref.stages.normalise import (
    IntensityRange,
    IntensityScale,
    background_of,
    range_for,
    range_of,
)
from volref.stages.settings import SegmentSettings

log = logging.getLogger(__name__)


def volume_intensity(vol: Volume, model: str | os.PathLike | None, settings: SegmentSettings,
                     check=None) -> tuple[IntensityRange, dict[str, Any]]:
    """The range ``vol`` is normalised with, and a record of how it was chosen.

    ``check(array, where)`` is called on every array read (the segment stage refuses NaN). The
    record's ``sample`` is a digest of the voxels read (None when none were), so a resumed run
    knows whether the image under it changed.
    """
    window = display_window(vol)
    if settings.intensity_range is not None:
        r = IntensityRange(*settings.intensity_range)
        return r, {"from": "intensity-range", "sample": None}
    if settings.intensity_window:
        if window is None:
            raise ConfigError(f"{vol.location} has no omero display window; give "
                              "--intensity-range LO HI instead")
        return IntensityRange(*window), {"from": "omero-window", "sample": None}
    if window is not None:
        log.info("the image's omero display window %s is not used (--intensity-window uses it)",
                 window)
    scale = model_card(model).get("intensity")
    if scale is not None:
        blocks = background_sample(vol)
        if check is not None:
            for b in blocks:
                check(b, "the intensity sample")
        bg = background_of(blocks)
        mapped = range_for(bg, IntensityScale.from_dict(scale))
        if mapped is not None:
            return mapped, {"from": "background", "background": bg.to_dict(),
                       "sample": _digest(blocks)}
        log.warning("%s shows no noise to scale by; using its 1-99.8 %% percentiles",
                    vol.location)
    sample = intensity_sample(vol)
    if check is not None:
        check(sample, "the intensity sample")
    return range_of(sample), {"from": "percentiles", "sample": _digest([sample])}


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
