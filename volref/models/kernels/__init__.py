"""Native kernels volref compiles itself, on first use, with the system's C compiler.

One so far: ``softmax_bf16.c``, an in-place softmax over the last axis of a bf16 tensor, for the
MAE's attention in CPU inference (``volref.models.mae.chunked_attention``): 2.5x PyTorch's
softmax on the same rows, 1.29x the MAE's dense throughput (BENCHMARKS.md).

It is plain C with AVX-512 intrinsics, loaded through ctypes (no PyTorch headers, no build step
at install): the first call compiles it (~1 s) into ``$VOLREF_CACHE`` (default
``~/.cache/volref``) under a name that hashes the source, so an edited kernel is rebuilt and
concurrent workers never see a half-written library. Where it cannot be used — no C compiler,
a CPU without AVX-512, another architecture, or ``VOLREF_NATIVE=0`` — :func:`softmax_bf16_`
says so and callers use PyTorch's softmax; the reason is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("softmax_bf16.c")
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    if os.environ.get("VOLREF_CACHE"):
        return Path(os.environ["VOLREF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "volref"


def _compile() -> ctypes.CDLL | None:
    """The loaded library, or None (with the reason logged)."""
    if os.environ.get("VOLREF_NATIVE", "1") == "0":
        log.info("native kernels off (VOLREF_NATIVE=0): PyTorch's softmax")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("native kernels need x86-64 (this is %s): PyTorch's softmax", platform.machine())
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler found (cc, gcc, $CC): PyTorch's softmax")
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join((cc,) + FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / f"softmax_bf16-{tag}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("compiling %s -> %s", SOURCE.name, path)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True,
                               capture_output=True, timeout=300)
                os.replace(tmp, path)  # atomic: other workers see all of it or nothing
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build %s (%s %s): PyTorch's softmax", SOURCE.name, exc,
                    detail.decode(errors="replace")[-500:])
        return None
    lib.volref_softmax_supported.restype = ctypes.c_int
    lib.volref_softmax_bf16.restype = ctypes.c_int
    lib.volref_softmax_bf16.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
    if not lib.volref_softmax_supported():
        log.info("this CPU lacks AVX-512 (f, bw, vl): PyTorch's softmax")
        return None
    return lib


def native_softmax() -> ctypes.CDLL | None:
    """The compiled kernel library (built on the first call), or None where it cannot run."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _compile()
    return _state["lib"]


def softmax_bf16_(x: torch.Tensor) -> bool:
    """Softmax over the last axis of ``x`` in place; False (``x`` untouched) where the kernel
    cannot run or ``x`` is not a contiguous bf16 CPU tensor. The GIL is released while it runs."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous():
        return False
    lib = native_softmax()
    if lib is None or x.numel() == 0:
        return lib is not None
    n = x.shape[-1]
    if lib.volref_softmax_bf16(x.data_ptr(), n, x.numel() // n) != 0:
        raise MemoryError("the softmax kernel could not allocate its row buffer")
    return True


@contextlib.contextmanager
def native_off() -> Iterator[None]:
    """Within the block, :func:`softmax_bf16_` declines (PyTorch's softmax runs): for side-by-side
    benchmarks. Not thread-safe; restores the previous state on exit."""
    saved = dict(_state)
    _state["lib"] = None
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)
