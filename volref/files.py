"""Files a user names (checkpoints, cluster files, lock files): regular files of a sane size.

A FIFO blocks the reader forever, a device streams without end, a directory raises an error that
names nothing. :func:`check_regular_file` looks at the path with ``stat`` (which never blocks)
and refuses anything else with one line, before a byte is read; :func:`read_small_file` then reads
it through a descriptor opened with ``O_NONBLOCK`` and checked again (``fstat``), so a path
swapped for a FIFO between the check and the read cannot hang the run either.

This module imports nothing but the standard library: every layer may use it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from volref.errors import VolrefError


class UserFileError(VolrefError, OSError):
    """A file the user named is missing, not a regular file, unreadable or too large."""


#: sizes above these are not what volref writes (a shipped checkpoint is ~10 MB)
MAX_CHECKPOINT_BYTES = 4 * 2**30
MAX_TEXT_BYTES = 1 * 2**20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, what: str,
                       max_bytes: int = MAX_CHECKPOINT_BYTES) -> Path:
    """``path`` as a :class:`Path` when it is a regular file (links followed) of at most
    ``max_bytes``; otherwise :class:`UserFileError` naming ``what`` it should have been."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserFileError(f"{what} not found: {path}") from None
    except NotADirectoryError:
        raise UserFileError(f"{what} not found: {path} (a parent is not a directory)") from None
    except OSError as exc:
        raise UserFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserFileError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise UserFileError(f"{what} {path} is {st.st_size:,} bytes; more than the "
                            f"{max_bytes:,} a {what} can be")
    return path


def read_small_file(path: str | os.PathLike, what: str,
                    max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; never blocks on a FIFO."""
    path = check_regular_file(path, what, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UserFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserFileError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
        data = os.read(fd, max_bytes + 1) if st.st_size else b""
        chunks = [data]
        while data and sum(map(len, chunks)) <= max_bytes:
            data = os.read(fd, max_bytes + 1)
            chunks.append(data)
    except OSError as exc:
        raise UserFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    out = b"".join(chunks)
    if len(out) > max_bytes:
        raise UserFileError(f"{what} {path} is larger than the {max_bytes:,} bytes it can be")
    return out


def read_head(path: str | os.PathLike, n: int) -> bytes:
    """The first ``n`` bytes of a regular file (opened without blocking, checked again)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UserFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserFileError(f"{path} is not a regular file")
        return os.read(fd, n)
    finally:
        os.close(fd)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` as a :class:`Path` when a file can be written there: its folder exists and is
    writable, and ``path`` is not a directory or anything but a regular file. Checked before
    the work, so a typo in a folder name costs one line, not the work and a traceback. A URL is
    refused without being shown (it may hold a password)."""
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", str(path))
    if scheme:
        raise UserFileError(f"cannot write {what} to a {scheme.group(1)}:// URL: give a local path")
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserFileError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserFileError(f"cannot write {what} {path}: folder {parent} is read-only")
    try:
        st = path.stat()
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise UserFileError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserFileError(f"cannot write {what} {path}: it is {_kind(st.st_mode)}")
    return path
