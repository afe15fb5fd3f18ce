"""Write a phantom as an OME-Zarr image with its ground-truth label images.

Layout written::

    OUT.ome.zarr/                 image: uint16, levels s0 s1 … (0 1 … for NGFF 0.4)
      labels/
        ground-truth/             classes 0 background, 1 IMS, 2 cristae, 3 matrix (uint8)
        ground-truth-instances/   one id per mitochondrion (uint32)
        degraded/                 1 where the SNR was lowered (uint8)
      volref/                     attributes: the phantom's settings and the volref version
"""

from __future__ import annotations

import logging
import os

import dask
from dask.delayed import Delayed

from volref import __version__
from volref.classes import (
    CLASS_COLORS,
    CLASS_PROPERTIES,
    DEGRADED_COLORS,
    DEGRADED_PROPERTIES,
    counted,
    mitochondria,
)
from volref.errors import OutputExistsError
from volref.io import (
    Axis,
    LabelInfo,
    create_label_image,
    create_multiscale,
    default_levels,
    open_group,
    pyramid_geometry,
    store_pyramid,
    validate_image,
)
from volref.io.store import create_store, prepare_new_store, redact
from volref.layout import DEGRADED, GROUND_TRUTH, GROUND_TRUTH_INSTANCES, META
from volref.synth import SynthConfig, make_phantom

log = logging.getLogger(__name__)



def write_phantom(config: SynthConfig, location: str | os.PathLike, *, version: str = "0.5",
                  levels: int | None = None, overwrite: bool = False) -> Delayed:
    """Create the store, its metadata and empty arrays; return the lazy work that fills them.

    The metadata is validated with ome-zarr-models before any voxel is computed. Compute the
    returned object (``dask.compute``) to render and write every chunk and level.
    """
    if version not in ("0.4", "0.5"):
        raise ValueError(f"NGFF version must be '0.4' or '0.5', got {version!r}")
    phantom = make_phantom(config)
    log.info("phantom %s: %s, %s", config.shape, mitochondria(phantom.scene.n_mitochondria),
             counted(len({int(r) for r in phantom.scene.degraded[:, 11]}), "degraded area",
                     "degraded areas"))
    prepare_new_store(location, overwrite=overwrite)
    root = create_store(location, 3 if version == "0.5" else 2)
    if root is None:
        raise OutputExistsError(f"{redact(location)} was created by another process just now")

    n_levels = levels or default_levels(config.shape)
    axes = tuple(Axis(n, "space", "micrometer") for n in ("z", "y", "x"))
    image_arrays = create_multiscale(
        root,
        pyramid_geometry(config.shape, config.voxel_size_um, n_levels, config.chunks, "uint16",
                         version, method="mean"),
        axes, version=version, name=f"volref phantom seed {config.seed}", method="mean")
    meta = root.create_group(META)
    meta.attrs["volref"] = {"version": __version__, "phantom": config.to_dict(),
                            "n_mitochondria": phantom.scene.n_mitochondria}

    works = [store_pyramid(phantom.image, image_arrays, "mean")]
    for name, data, dtype, info in (
        (GROUND_TRUTH, phantom.classes, "uint8", LabelInfo(CLASS_COLORS, CLASS_PROPERTIES)),
        (GROUND_TRUTH_INSTANCES, phantom.instances, "uint32", LabelInfo()),
        (DEGRADED, phantom.degraded, "uint8", LabelInfo(DEGRADED_COLORS, DEGRADED_PROPERTIES)),
    ):
        # labels are sampled at the top-left voxel of each 2x2, so their levels do not shift
        lv = pyramid_geometry(config.shape, config.voxel_size_um, n_levels, config.chunks, dtype,
                              version, method="nearest")
        _, arrays = create_label_image(root, name, lv, axes, version=version, info=info)
        works.append(store_pyramid(data, arrays, "nearest"))
    validate_image(open_group(location, mode="r"))
    log.info("writing %s (NGFF %s, %d levels)", redact(location), version, n_levels)
    return dask.delayed(_all_done)(works)


def _all_done(_: object) -> None:
    return None
