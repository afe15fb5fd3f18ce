"""Where a stage writes: into the input archive (adding groups only) or a separate store, and
the provenance it leaves there."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from volref import __version__
from volref.engine.manifest import Manifest
from volref.errors import OutputError, VolrefError
from volref.io import Multiscale, open_group, redact
from volref.io.store import (
    check_writable_group,
    create_store,
    discard_new_store,
    first_missing,
    is_url,
    prepare_new_store,
    write_file,
)
from volref.layout import META, PROVENANCE


@dataclass(frozen=True)
class Target:
    """Where a run writes: ``root`` at ``where``; ``made`` is the directory this run created for
    it (the store or its first missing parent), None when the store was there already or is
    remote (see :func:`refused_leaves_no_trace`)."""

    root: zarr.Group
    where: str
    made: Path | None = None


def open_target(image_location: str | os.PathLike, image: Multiscale,
                output: str | os.PathLike | None) -> Target:
    """The group a stage writes into and its location.

    Without ``output``: the input archive, opened for adding groups (refused when read-only).
    With ``output``: that store, created in the input's zarr format if it does not exist.
    """
    if output is None:
        root = open_group(image_location, mode="r+")
        check_writable_group(root, image_location)
        return Target(root, str(image_location))
    if str(output) == str(image_location):
        return open_target(image_location, image, None)
    made = first_missing(output)
    if made is not None or is_url(output):
        prepare_new_store(output)
        created = create_store(output, image.zarr_format,
                               {"volref": {"source": redact(image_location),
                                           "version": __version__}})
        if created is not None:
            return Target(created, str(output), made)
        # another run created it a moment ago: open it as any existing store (its lock decides)
    root = open_group(output, mode="r+")
    check_writable_group(root, output)
    if root.metadata.zarr_format != image.zarr_format:
        raise OutputError(f"{redact(output)} is zarr v{root.metadata.zarr_format} but the "
                          f"image is zarr v{image.zarr_format} (NGFF {image.version})")
    return Target(root, str(output))


@contextmanager
def refused_leaves_no_trace(target: Target, stages: Sequence[str]) -> Iterator[None]:
    """Remove the store a run created when the run is refused (a :class:`VolrefError`) before
    any of ``stages`` finished a block: a wrong ``--labels`` name or a missing segment record
    must not leave an empty output store behind. Work done is kept, so a run can resume."""
    try:
        yield
    except VolrefError:
        if target.made is not None and not _holds_work(target.root, stages):
            discard_new_store(target.where, target.made)
        raise


def _holds_work(root: zarr.Group, stages: Sequence[str]) -> bool:
    try:
        meta = root[META]
    except KeyError:
        return False
    if not isinstance(meta, zarr.Group):
        return False
    return any(Manifest(meta, s).finished() or Manifest(meta, s).done for s in stages)


def record_provenance(root: zarr.Group, stage: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``stage`` in ``volref/provenance.json`` (and the group's attributes)."""
    meta = root.require_group(META)
    attrs = dict(meta.attrs.get("volref", {}))
    prov = dict(attrs.get("provenance", {}))
    prov[stage] = {"volref": __version__, **entry}
    attrs["provenance"] = prov
    meta.attrs["volref"] = attrs
    write_file(meta, PROVENANCE, json.dumps(prov, indent=2, sort_keys=True).encode())
