"""Memory settings for processes that run model tasks: glibc's malloc thresholds, and bounds on
the CPU kernel caches of PyTorch's oneDNN backend.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to the OS. Setting any
such threshold also switches off glibc's dynamic mmap threshold, and every buffer above 128 KiB
is then mapped fresh, page-faulted in and unmapped again: a U-Net or MAE forward pass makes
hundreds of those. Measured on the demo with 2 workers, ``volref refine --method crf`` spent more
time in the kernel than in user code (266 s system, 249 s user; in one process: 22 s system).

:func:`steady_allocator` pins the values glibc's own dynamic rule settles at (mmap threshold
32 MiB, its maximum; trim threshold twice that), once per process, through ``mallopt``, which
overrides the environment: the demo's ``volref run`` on 2 workers takes 1:34 instead of 3:08.
Kept on the heap, freed buffers would stay resident between tasks, so
:func:`release_free_memory` hands free heap pages back to the OS (``malloc_trim``) after each
block task (``volref.engine.runner.run_task``): page faults once per task instead of once per
buffer. Where the C library is not glibc both do nothing.

On the CPU the MAE encodes exactly a tile's visible patches, so almost every tile gives its
matrix products a new shape. oneDNN keeps a compiled primitive per shape
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) and PyTorch's ideep layer keeps its own
(``LRU_CACHE_CAPACITY``, default 1024), about half a MiB each: a worker's memory grew block after
block until both were full (in one process, the 8x volume's refine blocks: 0.57 -> 0.95 GiB
resident after 32 blocks; a 1x run's worker stops after 2 blocks, at the low end).
:func:`bounded_kernel_caches` caps both at :data:`KERNEL_CACHE_CAPACITY` before the first model
pass (both libraries read the variables at first use; a value the user set wins): resident
memory stays at 0.44 GiB over the same blocks, and the blocks take the same time (41.3 s for 12
blocks, 41.4 s uncapped; with no cache at all 57.0 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from functools import lru_cache

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets beside a raised mmap threshold
#: compiled kernels kept per cache: the decoder's fixed shapes plus the latest encoder shapes
KERNEL_CACHE_CAPACITY = 64
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN, ideep


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@lru_cache(maxsize=1)
def steady_allocator() -> dict[str, int] | None:
    """Pin glibc's thresholds in this process (once); the values set, or None where it cannot."""
    libc = _libc()
    if libc is None or not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1):
        log.debug("mallopt unavailable: malloc thresholds left as they are")
        return None
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where it
    cannot."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def bounded_kernel_caches() -> dict[str, str]:
    """Cap oneDNN's and ideep's per-shape kernel caches in this process (see the module doc)
    unless the environment already sets them; the values in force. Only effective before the
    process's first oneDNN operation."""
    for name in KERNEL_CACHES:
        os.environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))
    return {name: os.environ[name] for name in KERNEL_CACHES}
