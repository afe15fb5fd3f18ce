"""What a run computes, as one frozen dataclass (the cluster is chosen separately).

Free of PyTorch and Dask, so the command line takes its option defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from volref.settings import Settings
from volref.stages.settings import LabelSettings, RefineSettings, SegmentSettings


@dataclass(frozen=True)
class RunSettings(Settings):
    """The settings of every stage of a run.

    ``min_voxels``: connected pieces with fewer voxels are specks, not mitochondria (a 40 px
    wide tube has ~1000 per slice). ``labels``: what ``refine`` refines (volref's own initial
    labels by default, or another tool's label image with its class map and uncertainty).
    """

    segmenter: str | None = None
    refiner: str | None = None
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    refine: RefineSettings = field(default_factory=RefineSettings)
    # refinement method: a name of volref.methods.REGISTRY; None: its DEFAULT_METHOD (fused) where
    # the shipped fusion fits the models, else mae (volref.pipeline.refine.default_method)
    method: str | None = None
    block_shape: tuple[int, int, int] | None = None
    overwrite: bool = False
    csv: bool = False
    min_voxels: int = 1000
    labels: LabelSettings = field(default_factory=LabelSettings)
    fusion: str | None = None  # method fused: the fusion file (default: the shipped one)
