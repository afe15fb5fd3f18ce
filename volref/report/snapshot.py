"""One z-slice of an image and its label images, side by side, as a PNG.

Class label images are drawn with the colours stored in their ``image-label`` metadata, so the
picture shows what napari will show; instance images get a fixed random palette.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from volref.errors import VolrefError
from volref.io import label_names, open_image, read_multiscale
from volref.io.image import reading
from volref.io.ngff import ome_attributes
from volref.io.store import member
from volref.layout import (
    DEGRADED,
    GROUND_TRUTH,
    GROUND_TRUTH_INSTANCES,
    INITIAL,
    MITOCHONDRIA,
    REFINED,
    UNCERTAINTY_LABELS,
    label_path,
)
from volref.report.panel import check_figure_file, stretch

log = logging.getLogger(__name__)


def snapshot(location: str | os.PathLike, out: str | os.PathLike, *, z: int | None = None,
             labels: Sequence[str] | None = None, crop: Sequence[int] | None = None,
             channel: int | None = None, timepoint: int | None = None) -> Path:
    """Draw slice ``z`` (default: the middle) of the image and of each label image.

    ``crop`` is ``(y0, y1, x0, x1)``; ``labels`` picks label images (default: all listed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_figure_file(out, "snapshot")
    vol = open_image(location, channel=channel, timepoint=timepoint)
    nz, ny, nx = vol.shape
    z = nz // 2 if z is None else z
    if not 0 <= z < nz:
        raise VolrefError(f"z = {z} is outside the image (0..{nz - 1})")
    y0, y1, x0, x1 = crop if crop is not None else (0, ny, 0, nx)
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise VolrefError(f"crop {crop} is outside the image ({ny} x {nx})")
    with reading(f"{vol.location} (z = {z})"):
        image = np.asarray(vol.data[z, y0:y1, x0:x1].compute(), dtype=np.float64)
    names = list(labels) if labels is not None else label_names(vol.group)
    unknown = [n for n in names if n not in label_names(vol.group)]
    if unknown:
        raise VolrefError(f"no label image named {', '.join(unknown)} in {vol.location}")

    from volref.report.gallery import class_legend, depth, scale_bar

    panels: list[tuple[str, np.ndarray, str | None]] = [("image", stretch(image), "gray")]
    for name in names:
        try:
            group = member(vol.group, label_path(name), where=vol.location)
        except KeyError:  # listed, but missing (or its metadata lacks a key zarr needs)
            raise VolrefError(f"{vol.location}: {label_path(name)} is listed but cannot be "
                              "opened") from None
        if not isinstance(group, zarr.Group):
            raise VolrefError(f"{vol.location}: {label_path(name)} is not a group")
        ms = read_multiscale(group, where=f"labels/{name}")
        lead = (0,) * (ms.ndim - 3)
        with reading(f"labels/{name} (z = {z})"):
            data = np.asarray(group[ms.levels[0].path][lead + (z, slice(y0, y1), slice(x0, x1))])
        panels.append((TITLES.get(name, name), _colour(data, group), None))

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.9), squeeze=False)
    for ax, (title, rgb, cmap) in zip(axes[0], panels):
        ax.imshow(rgb, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    scale_bar(axes[0][0], vol, x1 - x0)
    fig.suptitle(f"{Path(str(vol.location)).name}, {depth(vol, z)}", fontsize=10)
    if any(_is_class_image(vol.group["labels"][n]) for n in names):
        class_legend(fig, loc="lower center")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    log.info("wrote %s", out)
    return out


#: plain titles for the label images volref and its phantoms write
TITLES = {INITIAL: "initial (ensemble)", REFINED: "refined",
          MITOCHONDRIA: "mitochondria (one colour each)",
          UNCERTAINTY_LABELS: "uncertainty (steps of 0.1)", GROUND_TRUTH: "ground truth",
          GROUND_TRUTH_INSTANCES: "true mitochondria", DEGRADED: "low-SNR areas"}


def _is_class_image(group: zarr.Group) -> bool:
    """Whether a label image holds volref's four classes (its properties name them)."""
    _, ome = ome_attributes(group)
    meta = ome.get("image-label", {}) if isinstance(ome.get("image-label"), dict) else {}
    return any("class" in p for p in meta.get("properties", []) if isinstance(p, dict))


def _colour(data: np.ndarray, group: zarr.Group) -> np.ndarray:
    """RGB of a label slice: metadata colours if any, else a fixed palette per id."""
    _, ome = ome_attributes(group)
    meta = ome.get("image-label", {}) if isinstance(ome.get("image-label"), dict) else {}
    rgb = np.zeros(data.shape + (3,), dtype=np.float64)
    colours = meta.get("colors")
    if colours:
        for c in colours:
            rgba = np.asarray(c["rgba"], dtype=np.float64) / 255.0
            rgb[data == c["label-value"]] = rgba[:3] * rgba[3]
        return rgb
    ids = np.unique(data[data > 0])
    palette = np.random.default_rng(0).uniform(0.25, 1.0, (len(ids), 3))
    for i, v in enumerate(ids):
        rgb[data == v] = palette[i]
    return rgb
