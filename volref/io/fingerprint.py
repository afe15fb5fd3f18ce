"""What a stored array holds, cheaply: a fingerprint from its store's listing, not its bytes.

A stage records the fingerprint of every array it reads from the user (the image's levels) with
its settings, so results made from one image are never resumed or extended from another. The
fingerprint hashes each file below the array — its metadata document and every chunk — by key,
size and version token::

    local disk      key, size, modification time (ns)      one stat per file (os.scandir)
    object store    key, size, ETag (or its generation,    one LIST request per 1000 keys
                    md5 or last-modified time)
    HTTP            not listable: the array's metadata only (the caller adds a hash of what it
                    read anyway, the intensity sample)

Why a listing and not a hash of what each block read: checking a hash on resume needs the whole
image read again (hours on an archive), and a change inside a region only finished blocks read
would pass unseen; a rewritten chunk always gets a new modification time or ETag, and a listing
costs one metadata call per chunk (or per thousand chunks), never a read. The price: a copy of
the image that does not keep modification times (``cp -r`` without ``-p``) counts as changed
(``--overwrite`` recomputes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import zarr

log = logging.getLogger(__name__)

#: keys of an object store's listing that change whenever an object is rewritten, by preference
_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "LastModified", "last_modified",
                 "mtime", "updated", "created")


def array_fingerprint(array: zarr.Array) -> dict[str, Any]:
    """``{"files": n, "bytes": total, "listing": sha256[:16]}`` of every file below ``array``
    (``files`` is None where the store cannot be listed: an HTTP store)."""
    entries = _listing(array)
    h = hashlib.sha256()
    if entries is None:
        h.update(json.dumps(array.metadata.to_dict(), sort_keys=True, default=str).encode())
        return {"files": None, "bytes": None, "listing": h.hexdigest()[:16]}
    total = 0
    for key, size, version in sorted(entries):
        h.update(f"{key}\0{size}\0{version}\n".encode())
        total += size
    return {"files": len(entries), "bytes": total, "listing": h.hexdigest()[:16]}


def _listing(array: zarr.Array) -> list[tuple[str, int, str]] | None:
    store = array.store
    root = getattr(store, "root", None)
    if isinstance(root, Path):  # a LocalStore
        return _local(root / array.path)
    fs, base = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is None or base is None:
        return []  # a memory store (tests): nothing on disk to change behind volref's back
    if any(p in ("http", "https") for p in _protocols(fs)):
        log.warning("cannot list %s over HTTP: its fingerprint covers its metadata only",
                    array.path)
        return None
    prefix = f"{base.rstrip('/')}/{array.path}"
    try:
        found = fs.find(prefix, detail=True)
    except (OSError, ValueError, NotImplementedError) as exc:
        log.warning("cannot list %s (%s): its fingerprint covers its metadata only", array.path,
                    type(exc).__name__)
        return None
    out = []
    for path, info in found.items():
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")
        out.append((path[len(prefix):].lstrip("/"), int(info.get("size") or 0), version))
    return out


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = getattr(fs, "protocol", ())
    return (proto,) if isinstance(proto, str) else tuple(proto)


def _local(top: Path) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # gone or unreadable: reading the image will say so
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append((os.path.relpath(entry.path, top), st.st_size, str(st.st_mtime_ns)))
    return out


def changed_files(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A few words on how two fingerprints differ (for a refusal message)."""
    if not isinstance(old, dict):
        return "no fingerprint was recorded"
    if old.get("files") is None or new.get("files") is None:
        return "its metadata or sampled voxels differ"
    d_files = new["files"] - old["files"]
    d_bytes = new["bytes"] - old["bytes"]
    if d_files:
        return f"{abs(d_files)} file(s) {'added' if d_files > 0 else 'removed'}"
    if d_bytes:
        return f"its chunks now hold {d_bytes:+d} bytes"
    return "chunk files rewritten (same sizes, new modification times or ETags)"
