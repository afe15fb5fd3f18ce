"""One run at a time per output store: ``volref/run.lock``.

A second ``volref run`` on the same output refuses with a clear message instead of interleaving
its writes with the first. The lock names its owner (host, process id, start time); a lock whose
owner process no longer exists on this host is stale (a killed run) and is taken over. A lock held
from another host is never broken automatically: the message says how to remove it.

On a local store the lock file is created with ``O_CREAT | O_EXCL`` (atomic); on a remote store
through the store API (best effort: object stores have no atomic create).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr

from volref.errors import VolrefError
from volref.io.store import read_file, write_file

log = logging.getLogger(__name__)

NAME = "run.lock"


class StoreLockedError(VolrefError, RuntimeError):
    """Another volref run is writing into the same store."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: dict[str, Any]) -> bool:
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


@contextlib.contextmanager
def store_lock(meta: zarr.Group, local_dir: Path | None, where: str) -> Iterator[None]:
    """Hold the run lock of the store whose ``volref`` group is ``meta`` (``local_dir``: that
    group's directory when the store is local)."""
    me = _owner()
    body = json.dumps(me).encode()
    for _ in range(2):
        try:
            if local_dir is not None:
                local_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(local_dir / NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
            else:
                if read_file(meta, NAME) is not None:
                    raise FileExistsError
                write_file(meta, NAME, body)
            break
        except FileExistsError:
            raw = read_file(meta, NAME)
            try:
                owner = json.loads(raw) if raw else {}
            except ValueError:
                owner = {}  # torn by a kill while being written
            if owner and not _stale(owner):
                since = time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.localtime(float(owner.get("started", 0))))
                raise StoreLockedError(
                    f"{where} is being written by another volref run (host {owner.get('host')}, "
                    f"pid {owner.get('pid')}, since {since}); wait for it, or remove "
                    f"volref/{NAME} if that run is gone") from None
            log.warning("taking over the stale lock of %s (owner %s is gone)", where, owner)
            _remove(meta, local_dir)
    else:
        raise StoreLockedError(f"could not lock {where}")
    try:
        yield
    finally:
        _remove(meta, local_dir)


def _remove(meta: zarr.Group, local_dir: Path | None) -> None:
    if local_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            (local_dir / NAME).unlink()
        return
    from zarr.core.sync import sync

    key = f"{meta.path}/{NAME}".strip("/")
    with contextlib.suppress(FileNotFoundError):
        sync(meta.store.delete(key))
