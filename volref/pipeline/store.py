"""Where a stage writes: into the input archive (adding groups only) or a separate store, and
the provenance it leaves there."""

from __future__ import annotations

import json
import os
from typing import Any

import zarr

from volref import __version__
from volref.errors import OutputError
from volref.io import Multiscale, open_group, redact
from volref.io.store import (
    check_writable_group,
    create_store,
    is_url,
    local_path,
    prepare_new_store,
    write_file,
)
from volref.layout import META, PROVENANCE


def open_target(image_location: str | os.PathLike, image: Multiscale,
                output: str | os.PathLike | None) -> tuple[zarr.Group, str]:
    """The group a stage writes into and its location.

    Without ``output``: the input archive, opened for adding groups (refused when read-only).
    With ``output``: that store, created in the input's zarr format if it does not exist.
    """
    if output is None:
        root = open_group(image_location, mode="r+")
        check_writable_group(root, image_location)
        return root, str(image_location)
    if str(output) == str(image_location):
        return open_target(image_location, image, None)
    exists = local_path(output).exists() if not is_url(output) else False
    if not exists:
        prepare_new_store(output)
        created = create_store(output, image.zarr_format,
                               {"volref": {"source": redact(image_location),
                                           "version": __version__}})
        if created is not None:
            return created, str(output)
        # another run created it a moment ago: open it as any existing store (its lock decides)
    root = open_group(output, mode="r+")
    check_writable_group(root, output)
    if root.metadata.zarr_format != image.zarr_format:
        raise OutputError(f"{redact(output)} is zarr v{root.metadata.zarr_format} but the "
                          f"image is zarr v{image.zarr_format} (NGFF {image.version})")
    return root, str(output)


def record_provenance(root: zarr.Group, stage: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``stage`` in ``volref/provenance.json`` (and the group's attributes)."""
    meta = root.require_group(META)
    attrs = dict(meta.attrs.get("volref", {}))
    prov = dict(attrs.get("provenance", {}))
    prov[stage] = {"volref": __version__, **entry}
    attrs["provenance"] = prov
    meta.attrs["volref"] = attrs
    write_file(meta, PROVENANCE, json.dumps(prov, indent=2, sort_keys=True).encode())
