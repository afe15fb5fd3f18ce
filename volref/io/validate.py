"""Validation of written OME-Zarr groups with ome-zarr-models (the community's schema models)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import zarr
from pydantic import ValidationError

from volref.errors import InvalidMetadataError
from volref.io.ngff import ome_attributes
from volref.io.store import group_at


def validate_image(group: zarr.Group) -> None:
    """Validate an image group and every label image it lists; raise with a short summary."""
    version, _ = ome_attributes(group)
    models = _models(version)
    _check(models.Image.from_zarr, group, "image")
    try:
        labels = group_at(group, "labels")
    except KeyError:
        return
    _check(models.Labels.from_zarr, labels, "labels")
    _, ome = ome_attributes(labels)
    for name in ome.get("labels", []):
        validate_label_image(group_at(labels, name))


def validate_label_image(group: zarr.Group) -> None:
    """Validate a label image group with ome-zarr-models; raise ``InvalidMetadataError``."""
    version, _ = ome_attributes(group)
    _check(_models(version).ImageLabel.from_zarr, group, f"label image {group.name}")


def _models(version: str | None) -> ModuleType:
    if version == "0.5":
        import ome_zarr_models.v05 as v05

        return v05
    if version == "0.4":
        import ome_zarr_models.v04 as v04

        return v04
    raise InvalidMetadataError(f"no OME-Zarr metadata to validate (version {version!r})")


def _check(fn: Callable[[zarr.Group], Any], group: zarr.Group, what: str) -> None:
    try:
        fn(group)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidMetadataError(
            f"{what} fails OME-Zarr validation ({exc.error_count()} errors; first at {where}: "
            f"{first.get('msg')})") from exc
