"""One run at a time per output store: ``volref/run.lock``.

A second ``volref run`` on the same output refuses with a clear message instead of interleaving
its writes with the first. The lock names its owner: host, process id, the process's start time
(``/proc/PID/stat`` field 22, clock ticks since boot) and when it was taken. A lock is *stale* (a
killed run) when its host is this one and its process is gone, or the process now holding that id
started at another time (the id was reused); a stale lock is taken over. A lock held from another
host is never broken automatically: ``--break-lock`` (:func:`break_lock`) removes it on request.
A lock file volref did not write (a JSON list, a pid as text or beyond any pid, a directory) is
refused with one line; ``--break-lock`` removes it too (a directory is left to the user).

On a local store the lock file is written whole under a temporary name and then hard-linked to
``run.lock`` (atomic, and never seen empty or torn); on a remote store it goes through the store
API (best effort: object stores have no atomic create).

SIGTERM (a batch scheduler's time limit) while the lock is held ends the run the way Ctrl-C does:
a block being computed in this process finishes and writes its record first
(:func:`deferred_termination`), then :class:`Terminated` unwinds and the lock is released.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr

from volref.errors import VolrefError
from volref.files import UserFileError, read_small_file
from volref.io.store import read_file, write_file

log = logging.getLogger(__name__)

NAME = "run.lock"
PID_MAX = 2**22  # Linux's largest pid_max
BREAK_HINT = "pass --break-lock if no run is writing there"


class StoreLockedError(VolrefError, RuntimeError):
    """Another volref run is writing into the same store."""


class LockFileError(StoreLockedError):
    """``volref/run.lock`` exists but is not a lock volref wrote."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a run held its lock: unwinds like Ctrl-C, releasing the lock."""


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/PID/stat`` field 22), or
    None where that cannot be read (no such process, not Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or parentheses
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall: the 20th after the name
    except (IndexError, ValueError):
        return None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
            "started": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_owner(raw: bytes, where: str) -> dict[str, Any]:
    """The owner a lock file names; :class:`LockFileError` for anything volref did not write."""
    def bad(why: str) -> LockFileError:
        return LockFileError(f"{where}: volref/{NAME} is not a volref lock ({why}); {BREAK_HINT}")

    try:
        owner = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(owner, dict):
        raise bad(f"a JSON {type(owner).__name__}, not an object")
    host, pid = owner.get("host"), owner.get("pid")
    if not isinstance(host, str) or not host:
        raise bad("no host")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
        raise bad(f"pid {pid!r} is not a process id")
    pid_start, started = owner.get("pid_start"), owner.get("started", 0)
    if pid_start is not None and (isinstance(pid_start, bool) or not isinstance(pid_start, int)):
        raise bad(f"pid_start {pid_start!r} is not a number")
    if isinstance(started, bool) or not isinstance(started, (int, float)) \
            or not 0 <= started < 1e11:
        raise bad(f"started {started!r} is not a time")
    return owner


def stale(owner: dict[str, Any]) -> bool:
    """Whether the run that took the lock is gone (only decidable on its own host)."""
    if owner["host"] != socket.gethostname():
        return False
    pid = owner["pid"]
    if not _alive(pid):
        return True
    recorded = owner.get("pid_start")
    if recorded is None:  # a lock from a volref that did not record it: trust the pid
        return False
    now = process_start(pid)
    return now is not None and now != recorded


def _describe(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
    return f"host {owner['host']}, pid {owner['pid']}, since {since}"


def _read_lock(meta: zarr.Group, local_dir: Path | None, where: str) -> bytes | None:
    if local_dir is None:
        return read_file(meta, NAME)
    path = local_dir / NAME
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(mode):
        raise LockFileError(f"{where}: volref/{NAME} is a directory, not a lock file; remove it "
                            "if no run is writing there")
    try:
        return read_small_file(path, "lock file", max_bytes=4096)
    except UserFileError as exc:
        raise LockFileError(f"{where}: {exc}; {BREAK_HINT}") from None


def _create(meta: zarr.Group, local_dir: Path | None, body: bytes) -> None:
    """Create the lock file, or raise FileExistsError."""
    if local_dir is None:
        if read_file(meta, NAME) is not None:
            raise FileExistsError
        write_file(meta, NAME, body)
        return
    local_dir.mkdir(parents=True, exist_ok=True)
    tmp = local_dir / f".{NAME}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, local_dir / NAME)  # atomic; FileExistsError when another run holds it
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def store_lock(meta: zarr.Group, local_dir: Path | None, where: str) -> Iterator[None]:
    """Hold the run lock of the store whose ``volref`` group is ``meta`` (``local_dir``: that
    group's directory when the store is local)."""
    body = json.dumps(_owner()).encode()
    for _ in range(3):
        try:
            _create(meta, local_dir, body)
            break
        except FileExistsError:
            raw = _read_lock(meta, local_dir, where)
            if raw is None:
                continue  # released between our attempt and the read: try again
            owner = parse_owner(raw, where)
            if not stale(owner):
                elsewhere = owner["host"] != socket.gethostname()
                raise StoreLockedError(
                    f"{where} is being written by another volref run ({_describe(owner)}); wait "
                    "for it" + (f", or {BREAK_HINT} (it runs on another host)" if elsewhere
                                else "")) from None
            log.warning("taking over the stale lock of %s (%s is gone)", where, _describe(owner))
            _remove(meta, local_dir)
    else:
        raise StoreLockedError(f"could not lock {where}")
    try:
        with _terminate_on_sigterm():
            yield
    finally:
        _remove(meta, local_dir)


def break_lock(meta: zarr.Group, local_dir: Path | None, where: str) -> dict[str, Any] | None:
    """Remove the run lock of a store on the user's explicit request (``--break-lock``): held
    from another host, by a process this host cannot see, or a file volref did not write.

    A lock whose owner is alive on this host is still refused (that run is writing now).
    Returns the owner that was removed (``{}`` for a malformed file), None when there was none.
    """
    try:
        raw = _read_lock(meta, local_dir, where)
    except LockFileError:
        if local_dir is not None and (local_dir / NAME).is_dir():
            raise
        raw = b""
    if raw is None:
        return None
    try:
        owner = parse_owner(raw, where)
    except LockFileError:
        owner = {}
    if owner and owner["host"] == socket.gethostname() and not stale(owner):
        raise StoreLockedError(f"{where} is being written by a volref run on this host "
                               f"({_describe(owner)}); --break-lock breaks only locks of runs "
                               "that are gone or on other hosts")
    log.warning("breaking the run lock of %s (%s)", where,
                _describe(owner) if owner else "not a volref lock")
    _remove(meta, local_dir)
    return owner


def _remove(meta: zarr.Group, local_dir: Path | None) -> None:
    if local_dir is not None:
        with contextlib.suppress(FileNotFoundError):
            (local_dir / NAME).unlink()
        return
    from zarr.core.sync import sync

    key = f"{meta.path}/{NAME}".strip("/")
    with contextlib.suppress(FileNotFoundError):
        sync(meta.store.delete(key))


# ---------------------------------------------------------------- SIGTERM

_state = threading.local()
_pending = {"term": False}


def _in_block() -> bool:
    return getattr(_state, "depth", 0) > 0


def _on_sigterm(signum: int, frame: Any) -> None:
    _pending["term"] = True
    if not _in_block():
        raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """While the lock is held, SIGTERM raises :class:`Terminated` (deferred inside a block)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending["term"] = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _pending["term"] = False


@contextlib.contextmanager
def deferred_termination() -> Iterator[None]:
    """Run a block computed in this process to its end (chunks, then its record) before a
    SIGTERM that arrives meanwhile takes effect."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _pending["term"] and not _in_block():
        raise Terminated("terminated (SIGTERM)")


def break_store_lock(location: str | os.PathLike[str]) -> dict[str, Any] | None:
    """:func:`break_lock` on the store at ``location`` (nothing when it has no lock)."""
    from volref.io.store import has_member, is_url, local_path, open_group, redact

    if not is_url(location) and not local_path(location).exists():
        return None
    root = open_group(location, mode="r+")
    if not has_member(root, "volref"):
        return None
    meta = root["volref"]
    local = None if is_url(location) else local_path(location) / root.path / "volref"
    return break_lock(meta, local, redact(location))
