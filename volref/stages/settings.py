"""The settings of the model stages, as frozen dataclasses: the one place their defaults live.

Torch-free, so the command line reads its option defaults from them without loading PyTorch
(:func:`volref.settings.default_of`). What the fields do: :mod:`volref.stages.segment` and
:mod:`volref.stages.refine` (tiles, halos, ``tau``, blends, smoothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from volref.errors import SettingsError
from volref.methods import names
from volref.settings import PRECISIONS, Settings
from volref.stages.labels import IDENTITY_MAP, ClassTable, format_class_map, parse_class_map


def check_precision(precision: str) -> None:
    """Refuse a precision the models cannot compute in (``auto``, ``bf16``, ``fp32``)."""
    if precision not in PRECISIONS:
        raise SettingsError("precision", f"precision must be one of {', '.join(PRECISIONS)}, "
                            f"not {precision!r}")


@dataclass(frozen=True)
class SegmentSettings(Settings):
    """``batch`` tiles go through the ensemble at once (bounds memory: K members' activations)."""

    tile: int = 256
    halo: int = 32
    batch: int = 4
    precision: str = "auto"  # of the ensemble's weights and activations: auto, bf16 or fp32
    # intensities mapped to the model's 0 and 1 instead of the background estimate
    # (volref.stages.normalise): given, or the image's omero display window
    intensity_range: tuple[float, float] | None = None
    intensity_window: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.intensity_range is not None:
            try:
                lo, hi = (float(v) for v in self.intensity_range)
            except (TypeError, ValueError):
                raise SettingsError("intensity_range", "intensity range needs two numbers LO HI, "
                                    f"got {self.intensity_range!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise SettingsError("intensity_range",
                                    f"intensity range needs finite LO < HI, got {lo:g} {hi:g}")
            if self.intensity_window:
                raise SettingsError("intensity_range", "give an intensity range or use the "
                                    "display window, not both")
            object.__setattr__(self, "intensity_range", (lo, hi))



BLENDS = ("window", "centre")
SMOOTH_TRUNCATE = 3.0  # the smoothing Gaussian's reach, in sigmas
#: refinement methods (volref refine --method), from their registry (:mod:`volref.methods`)
METHODS = names()


@dataclass(frozen=True)
class RefineSettings(Settings):
    tile: int = 128
    stride: int = 64
    tau: float = 0.4
    near_px: float = 16.0
    batch: int = 0  # tiles per forward pass; 0: 1 on the CPU, 32 on a GPU (see refine_region)
    precision: str = "auto"  # of the MAE's weights and activations: auto, bf16 or fp32
    blend: str = "centre"  # how overlapping tiles combine: centre or window (module docstring)
    max_removed: float = 1.0  # a tile with more of its near patches removed is not rebuilt
    smooth: float = 1.0  # sigma (px) of a Gaussian over the class probabilities (module doc)

    def __post_init__(self) -> None:
        if self.tile % self.stride or self.stride % 4:
            raise SettingsError("stride", "stride must divide the tile and be a multiple of the "
                                "patch (4)")
        if self.blend not in BLENDS:
            raise SettingsError("blend", f"blend must be one of {', '.join(BLENDS)}, "
                                f"got {self.blend!r}")
        check_precision(self.precision)
        if self.batch < 0:
            raise SettingsError("batch", "batch must be >= 0 (0: chosen for the device)")
        if not 0 < self.max_removed <= 1:
            raise SettingsError("max_removed", "max_removed must be in (0, 1]")
        if not 0 <= self.tau <= 1:  # NaN fails too
            raise SettingsError("tau", f"tau must be in [0, 1], got {self.tau}")
        if not (math.isfinite(self.smooth) and self.smooth >= 0):
            raise SettingsError("smooth", f"smooth must be a finite number >= 0, got {self.smooth}")
        if self.smooth > 0 and self.blend != "centre":
            raise SettingsError("smooth", "smooth needs blend='centre' (set smooth=0 for the "
                                "window blend)")
        if self.smooth_reach > (self.tile - self.stride) // 2:
            raise SettingsError("smooth", f"smooth {self.smooth:g} reaches {self.smooth_reach} "
                                f"px, past half the tile overlap ({(self.tile - self.stride) // 2}"
                                " px); smooth=0 turns it off")

    def batch_for(self, device: object) -> int:
        """Tiles per forward pass. On the CPU one tile at a time with only its visible patches
        is fastest (benchmarks.mae_throughput: 1.6x the padded batch of 32); a GPU needs
        batches. Either way a tile's result does not depend on the other tiles."""
        if self.batch:
            return self.batch
        return 1 if str(device).split(":")[0] == "cpu" else 32  # a name or a torch.device

    @property
    def smooth_reach(self) -> int:
        return math.ceil(SMOOTH_TRUNCATE * self.smooth)

    @property
    def margin(self) -> int:
        """Pixels of context a slice needs around itself (the tiles' reach past it)."""
        return self.tile - self.stride


@dataclass(frozen=True)
class LabelSettings(Settings):
    """Which segmentation ``refine`` (and ``train refiner``) works on.

    ``labels``: a label image of the archive (``labels/<labels>``, written by any tool); None:
    volref's own initial labels with the segment stage's uncertainty (plain ``volref refine``).
    ``class_map``: its values for volref's four classes (:mod:`volref.stages.labels`; stored in
    canonical form, classes in volref's order). ``uncertainty``: the path of an image in the
    archive holding the normalised entropy or per-class probabilities; None: the segment stage's
    (the ensemble's) uncertainty.
    """

    labels: str | None = None
    class_map: str = IDENTITY_MAP
    uncertainty: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_map", format_class_map(parse_class_map(self.class_map)))
        if self.labels is None:
            if self.class_map != IDENTITY_MAP:
                raise SettingsError("class_map", "a class map is for a label image of another "
                                    "tool: give it with --labels NAME")
            if self.uncertainty is not None:
                raise SettingsError("uncertainty", "--uncertainty goes with --labels NAME (which "
                                    "may name volref's own initial labels too)")
            return
        if not self.labels or "/" in self.labels or self.labels in (".", ".."):
            raise SettingsError("labels", f"--labels takes the name of a label image (as listed "
                                f"in the archive's labels group), not {self.labels!r}")
        path = self.uncertainty
        if path is not None and (not path.strip("/") or path.startswith("/")
                                 or {".", ".."} & set(path.split("/"))):
            raise SettingsError("uncertainty", "--uncertainty takes the path of an image inside "
                                f"the archive (e.g. scores/entropy), not {path!r}")

    @property
    def table(self) -> ClassTable:
        """The values of each class, in volref's class order."""
        return parse_class_map(self.class_map)
