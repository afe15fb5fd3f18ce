"""Checking a stage's outputs against its records when a run resumes.

zarr stores no chunk that holds only the fill value (and deletes one rewritten to it), so a
missing chunk file is not, by itself, a sign of loss. A block record therefore lists the level-0
chunks its block wrote with data (:func:`written_chunks`, from the block in memory: no extra
I/O), and the stage's ``done`` record a digest of each coarser level's chunk listing. On resume,
one listing per output array (:func:`chunk_keys`) shows what went missing since (deleted files,
a lost volume of an object store)::

    block record  {"chunks": {"labels/volref-refined": ["0.1.1", ...]}, ...}
    done record   {"levels": {"labels/volref-refined": {"s1": [n, digest], ...}}, ...}

:func:`missing_blocks` names the finished blocks with a missing chunk (the stage recomputes them
and then its pyramid); :func:`stale_levels` the output images whose coarser levels lost chunks
(the stage rebuilds its pyramid). A record without ``chunks`` (an older volref) is trusted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from volref.layout import levels_of

_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def written_chunks(data: np.ndarray, start: Sequence[int], chunks: Sequence[int],
                   fill: Any) -> list[str]:
    """The spatial chunk indices (``"z.y.x"``, level 0) of the chunks that ``data``, written at
    ``start`` (chunk-aligned), fills with anything but ``fill`` — the chunks zarr stores."""
    origin = [s // c for s, c in zip(start, chunks)]
    counts = [-(-n // c) for n, c in zip(data.shape, chunks)]
    out = []
    for idx in np.ndindex(*counts):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks))
        part = data[region]
        if fill is None or np.any(part != fill):
            out.append(".".join(str(o + i) for o, i in zip(origin, idx)))
    return out


def chunk_keys(array: zarr.Array) -> set[str]:
    """Every chunk key stored below ``array`` (one listing; metadata documents left out)."""
    from zarr.core.sync import sync

    prefix = f"{array.path}/"

    async def collect() -> set[str]:
        return {k[len(prefix):] async for k in array.store.list_prefix(prefix)}

    return {k for k in sync(collect()) if k.rsplit("/", 1)[-1] not in _METADATA}


def _key(array: zarr.Array, spatial: str) -> str:
    lead = (0,) * (array.ndim - 3)
    return str(array.metadata.encode_chunk_key(lead + tuple(int(v) for v in spatial.split("."))))


def missing_blocks(root: zarr.Group, records: Mapping[str, Any],
                   outputs: Iterable[str]) -> dict[str, int]:
    """Block key -> number of its recorded level-0 chunks that are no longer stored, for every
    record in ``records`` (key -> payload) whose block lost a chunk of an image in ``outputs``
    (paths from ``root``)."""
    lost: dict[str, int] = {}
    for path in outputs:
        try:
            level0 = levels_of(root[path])[0]
        except KeyError:
            present: set[str] = set()
            level0 = None
        else:
            present = chunk_keys(level0)
        for key, payload in records.items():
            listed = payload.get("chunks") if isinstance(payload, dict) else None
            if listed is None:
                continue  # a record of an older volref: trusted
            wrote = listed.get(path) if isinstance(listed, dict) else None
            if wrote is None and isinstance(listed, dict):
                continue
            gone = _gone(level0, present, wrote)
            if gone:
                lost[key] = lost.get(key, 0) + gone
    return lost


def _gone(level0: zarr.Array | None, present: set[str], wrote: Any) -> int:
    """How many of the chunks ``wrote`` lists are not stored; a list that is not one (a record
    rewritten by hand) counts as one missing chunk, so its block is recomputed."""
    if not isinstance(wrote, list) or not all(isinstance(c, str) for c in wrote):
        return 1
    if level0 is None:
        return len(wrote)
    try:
        return sum(_key(level0, c) not in present for c in wrote)
    except (ValueError, TypeError):
        return 1


def level_listing(root: zarr.Group, outputs: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """Per output image, per coarser level: ``[chunks stored, digest of their keys]``."""
    out: dict[str, dict[str, list[Any]]] = {}
    for path in outputs:
        levels = levels_of(root[path])
        out[path] = {}
        for array in levels[1:]:
            keys = sorted(chunk_keys(array))
            digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
            out[path][array.basename] = [len(keys), digest]
    return out


def stale_levels(root: zarr.Group, recorded: Mapping[str, Any] | None,
                 outputs: Sequence[str]) -> list[str]:
    """The output images whose coarser levels no longer match the listing recorded when the
    stage finished (``recorded``: the done record's ``levels``; None: nothing to compare)."""
    if not isinstance(recorded, Mapping):
        return []
    try:
        now = level_listing(root, outputs)
    except KeyError:
        return list(outputs)
    return [p for p in outputs if p in recorded and recorded[p] != now.get(p)]
