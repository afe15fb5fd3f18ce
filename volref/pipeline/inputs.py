"""What ``refine`` refines: volref's own initial labels and the ensemble's uncertainty, or a
segmentation another tool wrote (``--labels NAME``), mapped to volref's classes
(``--class-map``), with its own uncertainty (``--uncertainty PATH``) or the ensemble's.

Inputs are looked up in the results store first, then in the image's archive (the other tool
wrote beside the image; ``--output`` holds volref's own outputs). A block task reads them as
volref's classes (uint8; past the volume: background) and normalised entropy (float32 in
[0, 1]; past the volume: 0), whatever their dtype, chunks and levels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from volref.classes import BACKGROUND
from volref.engine.manifest import Manifest
from volref.errors import VolrefError
from volref.io.inputs import StoredInput, find_image, find_label_image
from volref.layout import INITIAL, UNCERTAINTY_PATH, label_path, levels_of
from volref.pipeline.blocks import Source
from volref.pipeline.stage import StageContext, require_done
from volref.stages.labels import (
    ClassTable,
    check_fits,
    check_uncertainty,
    to_classes,
    to_uncertainty,
)
from volref.stages.settings import LabelSettings

log = logging.getLogger(__name__)

#: the plan checks the values of a label image's coarsest level when it has at most this many
#: voxels (a fast first look; every block checks its own voxels)
CHECK_VOXELS = 32_000_000


@dataclass(frozen=True)
class LabelsIn:
    """Labels as volref's classes: stored as them (``table`` None) or mapped."""

    source: Source
    table: ClassTable | None = None
    where: str = ""

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Classes ``(z, y, x)`` uint8 of ``[start, stop)``; past the volume: background."""
        if self.table is None:
            return self.source.read(start, stop, "constant")
        raw = self.source.read(start, stop, "constant", fill=self.table[BACKGROUND][0])
        return to_classes(raw, self.table, self.where)


@dataclass(frozen=True)
class UncertaintyIn:
    """Normalised entropy, stored as it (float or unsigned integer) or as class probabilities
    along ``channel_axis``."""

    source: Source
    channel_axis: int | None = None
    where: str = ""  # another tool's image (checked as it is read); "": volref's own

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Normalised entropy ``(z, y, x)`` float32 in [0, 1]; past the volume: 0."""
        raw = self.source.read(start, stop, "constant")
        if self.where:
            check_uncertainty(raw, self.where, self.channel_axis is not None)
        return to_uncertainty(raw, self.channel_axis)


def segment_record(ctx: StageContext, what: str) -> Manifest:
    """The finished segment stage's manifest (else: which command makes it)."""
    return require_done(ctx, "segment", what, "segment")


def own_inputs(ctx: StageContext) -> tuple[LabelsIn, UncertaintyIn, dict[str, Any]]:
    """The initial labels and uncertainty of volref's ensemble (plain ``volref refine``)."""
    upstream = segment_record(ctx, f"{label_path(INITIAL)} and {UNCERTAINTY_PATH} are")
    labels = levels_of(ctx.root[label_path(INITIAL)])[0]
    unc = levels_of(ctx.root[UNCERTAINTY_PATH])[0]
    return (LabelsIn(ctx.source(labels)), UncertaintyIn(ctx.source(unc)),
            {"segment": upstream.settings_digest()})


def user_inputs(ctx: StageContext, settings: LabelSettings
                ) -> tuple[LabelsIn, UncertaintyIn, dict[str, Any]]:
    """The label image ``settings.labels`` mapped by its class map, and ``settings.uncertainty``
    or the ensemble's; the record covers the names, the map and what the inputs are."""
    if settings.labels is None:
        raise ValueError("user_inputs needs settings.labels")
    stores = _stores(ctx)
    shape = ctx.vol.shape
    found = find_label_image(stores, settings.labels, shape)
    table = settings.table
    check_fits(table, found.array.dtype, found.where)
    _check_values(found, table)
    labels = LabelsIn(_source(found), table, found.where)
    record: dict[str, Any] = {"labels": settings.to_dict(),
                              "labels_array": _describe(found)}
    if settings.uncertainty is not None:
        given = find_image(stores, settings.uncertainty, shape)
        _check_uncertainty(given)
        unc = UncertaintyIn(_source(given), given.channel_axis, given.where)
        record["uncertainty_array"] = _describe(given)
    else:
        upstream = Manifest(ctx.meta, "segment")
        if not upstream.done:
            raise VolrefError(
                f"refining {found.where} needs an uncertainty: pass --uncertainty PATH (an "
                "entropy image or per-class probabilities in the archive), or let volref's "
                f"ensemble make one first: volref segment {ctx.vol.location} (with the same "
                "--output and --segmenter)")
        unc = UncertaintyIn(ctx.source(levels_of(ctx.root[UNCERTAINTY_PATH])[0]))
        record["segment"] = upstream.settings_digest()
    return labels, unc, record


def refined_input(ctx: StageContext) -> LabelsIn:
    """The labels the finished refine stage of this store refined, as volref's classes (what
    ``measure`` compares the refined labels with): another tool's when refine had ``--labels``,
    else volref's initial labels."""
    record = Manifest(ctx.meta, "refine").settings()
    given = LabelSettings.from_dict(record["labels"]) if "labels" in record else LabelSettings()
    if given.labels is None:
        return LabelsIn(ctx.source(levels_of(ctx.root[label_path(INITIAL)])[0]))
    found = find_label_image(_stores(ctx), given.labels, ctx.vol.shape)
    return LabelsIn(_source(found), given.table, found.where)


def _stores(ctx: StageContext) -> list[tuple[zarr.Group, str]]:
    """The results store, then the image's archive when that is another store."""
    image = ctx.vol.group
    same = str(ctx.root.store) == str(image.store) and ctx.root.path == image.path
    if same:
        return [(ctx.root, ctx.vol.location)]
    return [(ctx.root, "the results store"), (image, ctx.vol.location)]


def _source(found: StoredInput) -> Source:
    return Source(found.array, found.lead)


def _describe(found: StoredInput) -> dict[str, Any]:
    """What the digest holds of an input beside its name: not where the store is (a moved
    archive or another spelling of its path still resumes)."""
    return {"shape": list(found.array.shape), "dtype": str(found.array.dtype)}


def _check_values(found: StoredInput, table: ClassTable) -> None:
    """A first look, before any block runs: values of the coarsest level the map does not
    name (nearest-neighbour pyramids hold only values of the finest level)."""
    coarse = found.coarsest
    if coarse.size > CHECK_VOXELS:
        return
    to_classes(np.unique(np.asarray(coarse[found.lead])), table, found.where)  # raises


def _check_uncertainty(found: StoredInput) -> None:
    """A first look, before any block runs: the coarsest level's values (a mean pyramid keeps
    a NaN and values far outside [0, 1]; every block checks its own voxels)."""
    coarse = found.coarsest
    if coarse.size > CHECK_VOXELS:
        return
    check_uncertainty(np.asarray(coarse[found.lead]), found.where, found.channel_axis is not None)
