"""Making a store's results readable by the standard OME-Zarr readers, after the stages ran.

What standard readers (ome-zarr-py, napari-ome-zarr, ngio, Fractal) find from a store's root:

``--output`` store: a root image
    A separate results store has no image of its own, so readers found nothing there and every
    label image's ``source`` (``../../``) pointed at nothing. volref copies the image it
    processed — the selected channel and time point, every level, the same chunks, dtype and
    transforms — into the store's root as an OME-Zarr image (non-spatial axes kept, of size 1,
    like the label images). Why a full copy rather than a light pyramid or a reference: NGFF
    0.4/0.5 has no way to point a multiscale at arrays of another store, a label image must
    have as many levels as its image, and volref's own commands (``info``, ``snapshot``,
    ``report``, ``panel``) read the image from the store's root; the copy costs one channel of
    the input, compressed as the input's arrays are. The root's ``volref.source`` still names
    the input.

``volref/uncertainty``: named, with a display window
    The normalised entropy (uint8, 255 = 1.0) carries ``omero`` metadata: a channel label,
    contrast limits 0-255 and a colour. Readers only walk the root image and the label images it
    lists, so a label-like view is listed too:

``labels/volref-uncertainty``: the uncertainty in ten steps
    Values 1..10 are the normalised entropy in steps of 0.1 (``ceil(u * 10)``; 0 where it is
    exactly 0), with a colour ramp for every value (napari hides values without one) and each
    value's range as a property: napari-ome-zarr shows it as a layer beside the classes.
    It is recomputed whenever ``segment`` ran with other settings.

``tables/volref-mitochondria``: the metrics table in the ngio/Fractal convention
    (:mod:`volref.io.tables`), tied to ``labels/volref-mitochondria``, units stated.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from volref.engine.manifest import Manifest
from volref.engine.runner import Executor
from volref.io import LabelInfo, Volume, create_label_image, create_multiscale, label_levels
from volref.io.ngff import ome_attributes, set_ome
from volref.io.store import read_file
from volref.io.tables import write_feature_table
from volref.layout import (
    LABELS,
    META,
    METRICS_TABLE,
    MITOCHONDRIA,
    MITOCHONDRIA_TABLE,
    UNCERTAINTY_LABELS,
    UNCERTAINTY_PATH,
    label_path,
)
from volref.metrics.consistency import METRICS

log = logging.getLogger(__name__)

STEPS = 10
#: a dark-blue to yellow ramp (viridis at 10 points), background transparent
_RAMP = ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
         (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37))
UNCERTAINTY_COLORS = ((0, (0, 0, 0, 0)),) + tuple(
    (i + 1, (*rgb, 255)) for i, rgb in enumerate(_RAMP))
UNCERTAINTY_PROPERTIES = ({"label-value": 0, "uncertainty": "0"},) + tuple(
    {"label-value": i, "uncertainty": f"{(i - 1) / STEPS:.1f}-{i / STEPS:.1f}"}
    for i in range(1, STEPS + 1))
UNCERTAINTY_OMERO = {
    "channels": [{"label": "entropy", "color": "FFFF00", "active": True,
                  "coefficient": 1.0, "family": "linear", "inverted": False,
                  "window": {"min": 0.0, "max": 255.0, "start": 0.0, "end": 255.0}}],
    "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
}


def units_of() -> dict[str, str]:
    """The unit of every column of the metrics table (lengths are micrometres whatever the
    image's axes use: :mod:`volref.io.units`)."""
    units = {"label": f"id in {label_path(MITOCHONDRIA)}", "voxels": "voxel",
             "volume_um3": "micrometer^3", "skeleton_length_um": "micrometer"}
    for a in "zyx":
        units[f"bbox_{a}0"] = units[f"bbox_{a}1"] = "voxel index (level 0)"
        units[f"centroid_{a}"] = "voxel index (level 0)"
    for stage in ("initial", "refined"):
        units[f"{stage}_skeleton_end_points"] = "end points per z-slice"
        units[f"{stage}_skeleton_cycles"] = "cycles per z-slice"
        for m in METRICS[2:]:
            units[f"{stage}_{m}"] = "%"
    return units


def publish(vol: Volume, root: zarr.Group, executor: Executor, *, own_image: bool) -> None:
    """Add what standard readers need (see the module doc). ``own_image``: the store is the
    input's archive (it has its image); False for an ``--output`` store."""
    if not own_image:
        ensure_root_image(vol, root, executor)
    if _has(root, UNCERTAINTY_PATH):
        set_ome(root[UNCERTAINTY_PATH], vol.multiscale.version, "omero", UNCERTAINTY_OMERO)
        ensure_uncertainty_labels(vol, root, executor)
    if _has(root, META):
        raw = read_file(root[META], METRICS_TABLE)
        if raw is not None:
            table = pd.read_parquet(io.BytesIO(raw))
            write_feature_table(root, MITOCHONDRIA_TABLE, table, region=MITOCHONDRIA,
                                units=units_of(),
                                description="one row per mitochondrion (volref measure)")


def _has(root: zarr.Group, path: str) -> bool:
    try:
        root[path]
    except KeyError:
        return False
    return True


def ensure_root_image(vol: Volume, root: zarr.Group, executor: Executor) -> None:
    """Copy the processed image (every level) into the root of an ``--output`` store, unless
    the same selection is there already."""
    source = dict(root.attrs.get("volref", {}))
    version, ome = ome_attributes(root)
    if "multiscales" in ome and source.get("selection") == vol.selection:
        return
    ms = vol.multiscale
    src_arrays = [vol.group[lv.path] for lv in ms.levels]
    levels = label_levels(ms, src_arrays[0].dtype)
    for lv in levels:
        if lv.path in root:
            del root[lv.path]
    targets = create_multiscale(root, levels, ms.axes, version=ms.version, name=ms.name or "image",
                                method="mean")
    omero = _selected_omero(vol)
    if omero is not None:
        set_ome(root, ms.version, "omero", omero)
    index = tuple(slice(vol.selection[a.name], vol.selection[a.name] + 1)
                  for a in ms.axes[:ms.ndim - 3])
    work = []
    for src, dst in zip(src_arrays, targets):
        data = da.from_zarr(src, chunks=src.chunks)[index].rechunk(dst.chunks)
        work.append(da.store(data, dst, lock=False, compute=False))
    executor.compute(work)
    root.attrs["volref"] = {**source, "selection": dict(vol.selection)}
    log.info("copied the image (%d levels) into the output store's root", len(targets))


def _selected_omero(vol: Volume) -> dict[str, Any] | None:
    """The input's ``omero`` entry reduced to the selected channel (None when it has none)."""
    _, ome = ome_attributes(vol.group)
    omero = ome.get("omero")
    if not isinstance(omero, dict) or not isinstance(omero.get("channels"), list):
        return None
    channels = omero["channels"]
    c = next((v for k, v in vol.selection.items()
              if k.lower() == "c" or any(a.name == k and a.type == "channel"
                                         for a in vol.multiscale.axes)), 0)
    if not 0 <= c < len(channels):
        return None
    return {**omero, "channels": [channels[c]]}


def ensure_uncertainty_labels(vol: Volume, root: zarr.Group, executor: Executor) -> None:
    """Write ``labels/volref-uncertainty`` from ``volref/uncertainty``, level by level, unless it
    was made from the same segmentation."""
    made_from = Manifest(root[META], "segment").settings_digest()
    try:
        existing = root[LABELS][UNCERTAINTY_LABELS]
        if existing.attrs.get("volref", {}).get("segment") == made_from:
            return
    except KeyError:
        pass
    ms = vol.multiscale
    unc_group = root[UNCERTAINTY_PATH]
    _, unc_ome = ome_attributes(unc_group)
    sources = [unc_group[d["path"]] for d in unc_ome["multiscales"][0]["datasets"]]
    info = LabelInfo(UNCERTAINTY_COLORS, UNCERTAINTY_PROPERTIES)
    group, targets = create_label_image(root, UNCERTAINTY_LABELS, label_levels(ms, "uint8"),
                                        ms.axes, version=ms.version, info=info, overwrite=True)
    work = []
    for src, dst in zip(sources, targets):
        data = da.from_zarr(src, chunks=dst.chunks).map_blocks(steps, dtype=np.uint8)
        work.append(da.store(data, dst, lock=False, compute=False))
    executor.compute(work)
    group.attrs["volref"] = {"segment": made_from,
                             "description": "normalised entropy in steps of 0.1: value v holds "
                                            "(v - 1)/10 < u <= v/10"}


def steps(u8: np.ndarray) -> np.ndarray:
    """uint8 uncertainty (255 = 1.0) -> 0..10: ``ceil(u * 10)``."""
    return np.ceil(u8.astype(np.float32) * (STEPS / 255.0) - 1e-6).clip(0, STEPS).astype(np.uint8)
