"""What block tasks share: reading a block with its halo, writing its chunks, the per-process model
cache, and opening (or resuming) a stage's outputs.

Reading a region that reaches past the volume goes through :func:`volref.io.region.read_padded`
(mirrored images, background labels): whatever block asks, a voxel outside the volume reads the
same value, so overlapping reads agree.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import zarr

from volref.engine.allocator import bounded_kernel_caches, steady_allocator
from volref.engine.grid import Block
from volref.engine.outputs import written_chunks
from volref.errors import ImageDataError
from volref.io.region import read_padded
from volref.io.store import raise_if_connection_lost

log = logging.getLogger(__name__)

#: one model forward pass at a time per process (torch already uses every core it is given)
MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class Source:
    """A 3-D view of a stored array: the array and the index of its leading (t, c) axes."""

    array: zarr.Array
    lead: tuple[int | slice, ...] = ()  # a slice keeps its axis (class probabilities)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[-3:])

    def read(self, start: Sequence[int], stop: Sequence[int], mode: str,
             fill: Any = 0) -> np.ndarray:
        """Voxels ``[start, stop)`` (may reach past the volume): ``mode`` "mirror" or "constant"
        (``fill``), as :func:`~volref.io.region.read_padded`.

        A chunk that cannot be decoded raises :class:`ImageDataError` naming the chunk.
        """
        try:
            return self._read(start, stop, mode, fill)
        except Exception as exc:  # noqa: BLE001 - codec errors have no common base class
            self.raise_if_corrupt(start, stop, exc)
            raise

    def raise_if_corrupt(self, start: Sequence[int], stop: Sequence[int], exc: Exception) -> None:
        """Raise :class:`ImageDataError` naming the chunks of the region that fail to decode
        (read one by one) when there are any; otherwise return (``exc`` was something else).
        A network failure (a remote store that stopped answering) is not a corrupt chunk:
        :class:`~volref.io.store.ConnectionLostError` says so."""
        what = f"{self.array.path} (voxels {tuple(start)}..{tuple(stop)})"
        raise_if_connection_lost(self.array.store, exc, what)
        chunks = self.array.chunks[-3:]
        shape = self.shape
        ranges = [range(max(a, 0) // c, (min(b, n) - 1) // c + 1)
                  for a, b, c, n in zip(start, stop, chunks, shape)]
        bad = []
        for idx in np.ndindex(*(len(r) for r in ranges)):
            key = tuple(r[i] for r, i in zip(ranges, idx))
            region = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(key, chunks, shape))
            try:
                self.array[self.lead + region]
            except Exception as err:  # noqa: BLE001
                raise_if_connection_lost(self.array.store, err, what)
                bad.append(".".join(map(str, tuple(0 for _ in self.lead) + key)))
        if bad:
            names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise ImageDataError(f"cannot read {self.array.store_path}: chunk(s) {names} are "
                                 f"corrupt ({type(exc).__name__}: {exc})") from exc

    def _read(self, start: Sequence[int], stop: Sequence[int], mode: str,
              fill: Any = 0) -> np.ndarray:
        return read_padded(self.array, start, stop, mode, lead=self.lead, fill=fill)

    def write(self, block: Block, data: np.ndarray) -> list[str]:
        """Write ``block``'s chunks; returns the chunks written with data (``"z.y.x"``), which
        its record lists (:func:`~volref.engine.outputs.written_chunks`)."""
        self.array[self.lead + block.slices] = data
        return written_chunks(data, block.start, self.array.chunks[-3:], self.array.fill_value)


def level0(group: zarr.Group, path: str, ndim: int) -> Source:
    return Source(group[path], (0,) * (ndim - 3))


# ---------------------------------------------------------------- models, once per process


def device() -> str:
    """The device of this worker: its (first visible) GPU, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def precision_here() -> str:
    """The precision ``auto`` means on this worker's device (:func:`volref.models.precision.resolve`)."""
    from volref.models.precision import resolve
    from volref.settings import AUTO

    return resolve(AUTO, device())


@lru_cache(maxsize=8)
def cached_model(loader: Callable[..., Any], path: str, digest: str, dev: str) -> Any:
    """Models load once per worker process, keyed by file hash; never shipped in the graph.
    The first load also pins the process's malloc thresholds and caps its kernel caches
    (:mod:`volref.engine.allocator`): model passes allocate large buffers, which Dask's worker
    defaults page-fault in afresh, and give matrix products many shapes, each cached."""
    steady_allocator()
    bounded_kernel_caches()
    log.info("loading %s (%s) on %s", path, digest[:12], dev)
    return loader(path, device=dev)


# ---------------------------------------------------------------- stage outputs
