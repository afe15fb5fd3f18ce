"""OME-Zarr I/O: open images (NGFF 0.4 and 0.5, path or URL), write multiscale images and label
images, validate with ome-zarr-models. Never imports torch."""

from volref.io.image import (
    SUPPORTED_DTYPES,
    Volume,
    background_sample,
    display_window,
    intensity_sample,
    label_names,
    open_image,
    open_multiscale,
)
from volref.io.ngff import Axis, Level, Multiscale, read_multiscale
from volref.io.store import check_name, is_url, open_group, redact, scrub
from volref.io.validate import validate_image, validate_label_image
from volref.io.write import (
    LabelInfo,
    create_label_image,
    create_multiscale,
    default_levels,
    label_levels,
    pyramid_geometry,
    store_pyramid,
)

__all__ = [
    "SUPPORTED_DTYPES", "Axis", "LabelInfo", "Level", "Multiscale", "Volume", "check_name",
    "background_sample", "create_label_image", "create_multiscale", "display_window",
    "intensity_sample", "default_levels", "label_levels", "is_url", "label_names",
    "open_group", "open_image", "open_multiscale", "pyramid_geometry", "read_multiscale",
    "redact", "scrub", "store_pyramid", "validate_image", "validate_label_image",
]
