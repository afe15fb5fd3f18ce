"""Where a stage writes: into the input archive (adding groups only) or a separate store, and
the provenance it leaves there."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from volref import __version__
from volref.engine.lock import NAME as LOCK_NAME
from volref.engine.lock import StoreLockedError
from volref.engine.manifest import Manifest
from volref.engine.runner import BlocksRefusedError
from volref.errors import OutputError, VolrefError
from volref.io import Multiscale, open_group, redact
from volref.io.store import (
    check_writable_group,
    create_store,
    delete_file,
    delete_files,
    discard_new_store,
    first_missing,
    is_url,
    prepare_new_store,
    read_file,
    write_file,
)
from volref.layout import LABELS, MANIFESTS, META, PROVENANCE, TABLES

log = logging.getLogger(__name__)


#: where a run adds entries to a store that exists (groups and files), shallow first: a refused
#: run removes the new entries found here again (see :func:`refused_leaves_no_trace`)
WATCHED = ("", LABELS, TABLES, META, f"{META}/{MANIFESTS}")
#: the metadata documents of a group (a run rewrites those of ``labels/`` to list a new image)
DOCUMENTS = ("zarr.json", ".zattrs", ".zgroup")


@dataclass(frozen=True)
class Before:
    """What a store held where a run adds: the entries (names) below each :data:`WATCHED`
    prefix that exists, and the bytes of those prefixes' metadata documents."""

    entries: dict[str, frozenset[str]]
    documents: dict[str, bytes]


@dataclass(frozen=True)
class Target:
    """Where a run writes: ``root`` at ``where``; ``made`` is the directory this run created for
    it (the store or its first missing parent), None when the store was there already or is
    remote; ``before`` is what a store that was there held (see
    :func:`refused_leaves_no_trace`)."""

    root: zarr.Group
    where: str
    made: Path | None = None
    before: Before | None = None


def open_target(image_location: str | os.PathLike, image: Multiscale,
                output: str | os.PathLike | None) -> Target:
    """The group a stage writes into and its location.

    Without ``output``: the input archive, opened for adding groups (refused when read-only).
    With ``output``: that store, created in the input's zarr format if it does not exist.
    """
    if output is None:
        root = open_group(image_location, mode="r+")
        check_writable_group(root, image_location)
        return Target(root, str(image_location), before=snapshot(root))
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
    return Target(root, str(output), before=snapshot(root))


@contextmanager
def refused_leaves_no_trace(target: Target, stages: Sequence[str]) -> Iterator[None]:
    """Undo what a run added when it is refused (a :class:`VolrefError`) before any of
    ``stages`` finished a block: a new store goes with the parents it made; in a store that was
    there (the user's archive), the entries the run added where it adds (:data:`WATCHED`: an
    empty ``volref/`` group, a listed ``labels/volref-initial``) go, and the metadata documents
    there get their bytes back. A wrong ``--labels`` name, a junk checkpoint or a NaN voxel
    leaves nothing behind. Work done is kept, so a run can resume, except block records of a
    stage whose blocks refused their input (:class:`BlocksRefusedError`): nothing can resume
    until the input changes, so those go too unless a stage is done. A run refused the lock
    removes nothing: another run is writing there."""
    try:
        yield
    except StoreLockedError:
        raise  # another run holds the store: what is new there may be its work
    except VolrefError as exc:
        if not _holds_work(target.root, stages, isinstance(exc, BlocksRefusedError)):
            if target.made is not None:
                discard_new_store(target.where, target.made)
            elif target.before is not None:
                restore(target.root, target.before)
        raise


def _holds_work(root: zarr.Group, stages: Sequence[str], refused: bool = False) -> bool:
    """Whether a stage is done, or (unless its blocks ``refused`` their input) has finished
    blocks."""
    try:
        meta = root[META]
    except KeyError:
        return False
    if not isinstance(meta, zarr.Group):
        return False
    return any(Manifest(meta, s).done or (not refused and Manifest(meta, s).finished())
               for s in stages)


def snapshot(root: zarr.Group) -> Before:
    """What ``root``'s store holds where a run adds (a listing of a few prefixes, not of the
    image's chunks)."""
    entries: dict[str, frozenset[str]] = {}
    documents: dict[str, bytes] = {}
    for prefix in WATCHED:
        names = _entries(root, prefix)
        if not names:
            continue
        entries[prefix] = names
        for doc in DOCUMENTS:
            raw = read_file(root, _join(prefix, doc)) if doc in names else None
            if raw is not None:
                documents[_join(prefix, doc)] = raw
    return Before(entries, documents)


def restore(root: zarr.Group, before: Before) -> None:
    """Remove the entries a run added below :data:`WATCHED` since ``before`` and give the
    metadata documents there their old bytes: only what the run created goes. A new ``volref/``
    group that another run has locked since (it took the lock this run released) stays."""
    for prefix, old in before.entries.items():
        for name in sorted(_entries(root, prefix) - old):
            path = _join(prefix, name)
            if path == META and read_file(root, f"{META}/{LOCK_NAME}") is not None:
                continue
            log.debug("removing %s, which a refused run added", path)
            _delete(root, path)
    for path, raw in before.documents.items():
        if read_file(root, path) != raw:
            write_file(root, path, raw)


def _entries(root: zarr.Group, prefix: str) -> frozenset[str]:
    from zarr.core.sync import sync

    key = _join(root.path, prefix)

    async def names() -> list[str]:
        return [n async for n in root.store.list_dir(key)]

    return frozenset(sync(names()))


def _delete(root: zarr.Group, path: str) -> None:
    """Remove ``path`` below ``root``: a group or array with everything below it, or a file."""
    try:
        delete_files(root, path)
    except ValueError:  # a file (a local store says so)
        pass
    try:
        delete_file(root, path)
    except FileNotFoundError:
        pass


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def record_provenance(root: zarr.Group, stage: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``stage`` in ``volref/provenance.json`` (and the group's attributes)."""
    meta = root.require_group(META)
    attrs = dict(meta.attrs.get("volref", {}))
    prov = dict(attrs.get("provenance", {}))
    prov[stage] = {"volref": __version__, **entry}
    attrs["provenance"] = prov
    meta.attrs["volref"] = attrs
    write_file(meta, PROVENANCE, json.dumps(prov, indent=2, sort_keys=True).encode())
