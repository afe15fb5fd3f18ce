"""Batches made ahead: one background thread draws an epoch's batches while the model trains on
the ones before, so a GPU does not wait for numpy.

::

    thread "volref-batches":  make 1 ─ make 2 ─ make 3 ─ (waits: queue full) ─ make 4 …
                                   │       │       │
    queue (depth 2):               ▼       ▼       ▼
    training loop:              step 1 ──────── step 2 ──────── step 3 ──── …

Deterministic by construction: one thread calls ``make`` exactly ``count`` times, in order, and
is the only user of the random stream ``make`` draws from while it runs; the loop takes the
batches in that order. So the batches, and the random stream's state once the epoch's batches
are all made, are those of making each batch in the loop (``depth=0``) — the same weights and
the same resumable state (written after each epoch, when the thread has finished). The loop
must not touch that random stream until the iteration ends.

An exception in ``make`` is raised in the loop at the batch it would have made; leaving the loop
early (an error, an interrupt, a stopping observer) stops the thread before returning.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

#: how long the thread waits on a full queue before it looks whether it should stop (s)
POLL_S = 0.1


class _Failed:
    """An exception raised by ``make``, passed through the queue."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetch(Generic[T]):
    """``count`` results of ``make()``, made by a background thread at most ``depth`` ahead of
    the loop that takes them (``depth=0``: made in the loop, no thread).

    Use as a context manager around the loop, so that leaving it early stops the thread::

        with Prefetch(lambda: draw(rng), steps, depth=2) as batches:
            for batch in batches:
                ...
    """

    def __init__(self, make: Callable[[], T], count: int, depth: int = 2) -> None:
        if count < 0 or depth < 0:
            raise ValueError(f"count and depth must be >= 0, got {count} and {depth}")
        self.make, self.count, self.depth = make, count, depth
        self._queue: queue.Queue[T | _Failed] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetch[T]:
        if self.depth > 0 and self.count > 0:
            self._thread = threading.Thread(target=self._produce, name="volref-batches",
                                            daemon=True)
            self._thread.start()
        return self

    def __iter__(self) -> Iterator[T]:
        if self._thread is None:
            if self.depth > 0 and self.count > 0:
                raise RuntimeError("Prefetch with depth > 0 iterates inside its with-block")
            for _ in range(self.count):
                yield self.make()
            return
        for _ in range(self.count):
            item = self._queue.get()
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making) and drop what it made."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=POLL_S)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None

    def _produce(self) -> None:
        for _ in range(self.count):
            if self._stop.is_set():
                return
            try:
                item: T | _Failed = self.make()
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, raised there
                item = _Failed(exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failed):
                return
