"""Running block tasks: on a Dask cluster, or one by one in this process (for debugging).

A stage hands the runner a list of :class:`BlockTask` — a pure function and its arguments per
block — and the runner submits those not yet finished, with retries, routes model tasks to GPU
workers, reports progress to an observer and gathers failures into one summary. Scheduling policy
lives here; what a block computes lives in the pipeline and the stages.

Resources: when some worker advertises a ``GPU`` resource, model tasks ask for ``{"GPU": 1}``
(so they run only there, one at a time per GPU); when some worker advertises ``CPU``, other
tasks ask for ``{"CPU": 1}`` and stay off GPU-only workers. Without such workers no resources are
requested and every worker takes every task. Resources are given per submitted task, not through
``dask.annotate``, so graph optimisation cannot drop them.

Batches: on a cluster, :func:`run_blocks` keeps a bounded window of tasks in flight (a few per
worker; the client never holds a future per block) and puts several blocks into one task when
blocks are quick: it measures the blocks' own time on the workers and sizes the next batches to
about :data:`TASK_SECONDS` of work (at most :data:`MAX_BATCH` blocks). Blocks that take seconds
stay one per task; thousands of small blocks cost the client, the scheduler and the workers a
task per batch, not per block. Each block in a batch is still its own unit: its own record (the
stage's function writes it), its own retries and its own result or error, so a batch changes no
byte and resuming loses at most the blocks that were running.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask

from volref.engine.allocator import release_free_memory
from volref.engine.lock import deferred_termination
from volref.errors import VolrefError

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

Observer = Callable[[dict[str, Any]], None]

#: a batch of quick blocks is sized to about this much work on its worker (seconds)
TASK_SECONDS = 1.0
#: the most blocks one task runs
MAX_BATCH = 256
#: tasks in flight per worker (at least :data:`MIN_WINDOW` in all)
WINDOW_PER_WORKER, MIN_WINDOW = 3, 4


class BlocksFailedError(VolrefError, RuntimeError):
    """Some blocks failed after their retries; finished blocks are kept for the next run."""

    def __init__(self, stage: str, failed: dict[str, str]) -> None:
        self.stage, self.failed = stage, failed
        first = "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        super().__init__(f"{stage}: {len(failed)} block(s) failed: {first}{more}. Finished blocks "
                         "are recorded; run the same command again to retry the rest")


class ConnectionLostBlocksError(BlocksFailedError, ConnectionError):
    """Blocks failed because a remote store stopped answering (not because of their data)."""

    def __init__(self, stage: str, failed: dict[str, str]) -> None:
        self.stage, self.failed = stage, failed
        first = next(iter(failed.values()))
        VolrefError.__init__(self, f"{stage}: {len(failed)} block(s) not done: {first}. Finished "
                             "blocks are recorded")


class BlocksRefusedError(BlocksFailedError):
    """Blocks refused their input (each raised a :class:`VolrefError`: NaN intensities, label
    values the class map does not name, ...): a retry cannot help until the input is fixed, so
    the message is the first refusal's (in block order), on one line, and the run that made
    this stage's records discards them (see :func:`volref.pipeline.store.refused_leaves_no_trace`).
    ``first`` is that refusal; it is also the ``__cause__``."""

    def __init__(self, stage: str, failed: dict[str, str], first: VolrefError) -> None:
        self.stage, self.failed, self.first = stage, failed, first
        more = f" (and {len(failed) - 1} more block(s))" if len(failed) > 1 else ""
        VolrefError.__init__(self, f"{stage}: {first}{more}")


@dataclass(frozen=True)
class Refused:
    """What a task on a worker returns instead of raising when it refuses its input (a
    :class:`VolrefError` that is not an ``OSError``): a retry cannot help, and the worker does
    not log it as a failed computation (the run's one line says it)."""

    error: VolrefError


@dataclass(frozen=True)
class Failed:
    """A block of a batch that raised after its retries (returned, so the batch's other blocks
    are kept)."""

    error: BaseException


@dataclass(frozen=True)
class BlockTask:
    key: str  # the block's region name (manifest key)
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    gpu: bool = False  # runs a model: goes to GPU workers when there are any
    #: the box ``(start, stop)`` the task reads (may reach past the volume) and the one it writes
    #: (its block), declared by the stage when it plans
    reads: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    writes: tuple[tuple[int, ...], tuple[int, ...]] | None = None


@dataclass
class StageReport:
    stage: str
    total: int
    skipped: int = 0
    computed: int = 0
    seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "blocks": self.total, "skipped": self.skipped,
                "computed": self.computed, "seconds": round(self.seconds, 3)}


class _Done:
    """A finished in-process 'future'."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Executor:
    """Submit functions to a distributed client, or run them here when ``client`` is None."""

    def __init__(self, client: Client | None = None, retries: int = 2) -> None:
        self.client = client
        self.retries = retries
        # keys are unique per run: a shared scheduler must never hand back another run's result
        self.token = uuid.uuid4().hex[:8]
        self.gpu_workers = self.cpu_resource = False
        self.workers = 1
        #: block tasks handed to the scheduler (or run here) so far: a block or a batch of
        #: blocks a task (benchmarks count the engine's cost with it)
        self.tasks = 0
        #: addresses of the workers model tasks run on (those with a GPU resource, if any: see
        #: submit); empty: any worker
        self.model_workers: list[str] = []
        if client is not None:
            resources = {a: w.get("resources", {}) or {}
                         for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
            self.workers = max(1, len(resources))
            self.model_workers = [a for a, r in resources.items() if "GPU" in r]
            self.gpu_workers = bool(self.model_workers)
            self.cpu_resource = any("CPU" in r for r in resources.values())

    @property
    def inline(self) -> bool:
        return self.client is None

    def _resources(self, gpu: bool) -> dict[str, int] | None:
        if gpu and self.gpu_workers:
            return {"GPU": 1}
        if not gpu and self.cpu_resource:
            return {"CPU": 1}
        return None

    def submit(self, fn: Callable[..., Any], *args: Any, key: str, gpu: bool = False) -> Any:
        """A future of ``fn(*args)``; ``args`` may hold futures of this executor."""
        self.tasks += 1
        if self.client is None:
            with deferred_termination():  # a SIGTERM meanwhile waits for the block's record
                try:
                    values = [a.result() if isinstance(a, _Done) else a for a in args]
                    return _Done(fn(*values))
                except Exception as exc:  # noqa: BLE001 - reported per block by the caller
                    return _Done(error=exc)
        return self.client.submit(run_task, fn, *args, key=f"{key}-{self.token}", pure=False,
                                  retries=self.retries, resources=self._resources(gpu))

    def gather(self, futures: Sequence[Any]) -> list[Any]:
        if self.client is None:
            return [f.result() for f in futures]
        gathered: list[Any] = self.client.gather(list(futures))
        for value in gathered:
            if isinstance(value, Refused):
                raise value.error
        return gathered

    def compute(self, work: Any) -> Any:
        """Compute a Dask collection (the pyramid levels) on the same workers."""
        if self.client is None:
            return dask.compute(work, scheduler="sync")[0]
        future = self.client.compute(dask.delayed(list)(work) if isinstance(work, list) else work,
                                     resources=self._resources(False))
        return future.result()

    def run_batched(self, stage: str, tasks: Sequence[BlockTask]
                    ) -> Iterator[tuple[str, Any, BaseException | None]]:
        """``(key, value, error)`` per block as batches finish (see the module doc: a bounded
        window of tasks in flight, batches sized from the blocks' measured time). Tasks must not
        take futures as arguments."""
        from distributed import as_completed

        queue = deque(tasks)
        window = max(MIN_WINDOW, WINDOW_PER_WORKER * self.workers)
        flight: dict[Any, list[BlockTask]] = {}
        pending = as_completed()
        block_seconds: float | None = None  # the latest batch's mean time a block

        def fill() -> None:
            while queue and len(flight) < window:
                size = batch_size(block_seconds, len(queue), window)
                batch = [queue.popleft()]
                while queue and len(batch) < size and queue[0].gpu == batch[0].gpu:
                    batch.append(queue.popleft())
                key = f"{stage}-{batch[0].key}" + (f"+{len(batch) - 1}" if len(batch) > 1 else "")
                fut = self.client.submit(  # type: ignore[union-attr]
                    run_batch, tuple((t.fn, t.args) for t in batch), self.retries,
                    key=f"{key}-{self.token}", pure=False, retries=self.retries,
                    resources=self._resources(batch[0].gpu))
                flight[fut] = batch
                pending.add(fut)
                self.tasks += 1

        fill()
        for fut in pending:
            batch = flight.pop(fut)
            if fut.status == "error":  # the task itself: a worker lost, an unpicklable result
                error = fut.exception()
                for t in batch:
                    yield t.key, None, error
            else:
                outcomes, seconds = fut.result()
                block_seconds = seconds / len(batch)
                for t, value in zip(batch, outcomes):
                    if isinstance(value, (Refused, Failed)):
                        yield t.key, None, value.error
                    else:
                        yield t.key, value, None
            fut.release()
            fill()


def run_blocks(executor: Executor, stage: str, tasks: Sequence[BlockTask],
               finished: dict[str, Any] | None = None,
               observer: Observer | None = None) -> StageReport:
    """Run every task whose key is not in ``finished``; raise :class:`BlocksFailedError` at the
    end if any failed after its retries (:class:`BlocksRefusedError` when blocks refused their
    input). Results of finished blocks (their manifest payloads)
    and of new ones are returned together, keyed by block."""
    finished = finished or {}
    todo = [t for t in tasks if t.key not in finished]
    report = StageReport(stage, total=len(tasks), skipped=len(tasks) - len(todo))
    keys = {t.key for t in tasks}
    report.results.update({k: v for k, v in finished.items() if k in keys})
    notify = observer or (lambda event: None)
    notify({"event": "start", "stage": stage, "total": len(tasks), "done": report.skipped})
    start = time.perf_counter()
    failed: dict[str, str] = {}
    lost: set[str] = set()  # failed for want of a connection
    refused: dict[str, VolrefError] = {}  # refused their input
    if executor.inline:
        futures = {}
        for t in todo:  # run and report one by one, so progress moves
            fut = executor.submit(t.fn, *t.args, key=f"{stage}-{t.key}", gpu=t.gpu)
            futures[fut] = t.key
            _collect(report, failed, t.key, fut.value, fut.error, notify, stage, lost,
                     refused)
    else:
        for key, value, error in executor.run_batched(stage, todo):
            _collect(report, failed, key, value, error, notify, stage, lost, refused)
    report.seconds = time.perf_counter() - start
    notify({"event": "end", "stage": stage, **report.to_dict(), "failed": len(failed)})
    if refused:
        first = refused[next(t.key for t in todo if t.key in refused)]
        raise BlocksRefusedError(stage, failed, first) from first
    if failed and lost == set(failed):
        raise ConnectionLostBlocksError(stage, {k: failed[k].split(": ", 1)[-1] for k in failed})
    if failed:
        raise BlocksFailedError(stage, failed)
    return report


def _collect(report: StageReport, failed: dict[str, str], key: str, value: Any,
             error: BaseException | None, notify: Observer, stage: str, lost: set[str],
             refused: dict[str, VolrefError]) -> None:
    if error is not None:
        failed[key] = f"{type(error).__name__}: {error}"
        if isinstance(error, ConnectionError):
            lost.add(key)
        if not isinstance(error, VolrefError):  # a bug or the system's: logged in full
            log.error("%s block %s failed: %r", stage, key, error)
        else:  # the user's: the run's one line says it
            log.debug("%s block %s failed: %s", stage, key, error)
            if not isinstance(error, OSError):  # its input, not a store that may come back
                refused[key] = error
    else:
        report.computed += 1
        report.results[key] = value
    notify({"event": "block", "stage": stage, "key": key, "ok": error is None,
            "done": report.skipped + report.computed + len(failed), "total": report.total})


def batch_size(block_seconds: float | None, queued: int, window: int) -> int:
    """Blocks in the next task: one until a block's time is known, then about
    :data:`TASK_SECONDS` of work, at most :data:`MAX_BATCH` and at most a share of what is
    queued that keeps every slot of the window busy to the end."""
    if block_seconds is None:
        return 1
    by_time = int(TASK_SECONDS / max(block_seconds, 1e-6))
    return max(1, min(by_time, MAX_BATCH, queued // window))


def run_batch(items: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]], retries: int
              ) -> tuple[list[Any], float]:
    """Blocks of one task on a worker, each as :func:`run_task` with its own ``retries``: a
    value, :class:`Refused` or :class:`Failed` per block, and the blocks' seconds."""
    start = time.perf_counter()
    outcomes: list[Any] = []
    for fn, args in items:
        for attempt in range(retries + 1):
            try:
                outcomes.append(run_task(fn, *args))
                break
            except Exception as exc:  # noqa: BLE001 - the block's, reported by the client
                if attempt == retries:
                    log.error("block task %s failed after %d tries", getattr(fn, "__name__", fn),
                              retries + 1, exc_info=True)
                    outcomes.append(Failed(exc))
    return outcomes, time.perf_counter() - start


def run_task(fn: Callable[..., Any], *args: Any) -> Any:
    """A block task on a worker: ``fn(*args)``, then the worker's free heap pages go back to
    the OS (:mod:`volref.engine.allocator`), so a worker's resident memory after a task is what
    it holds, not what the largest task before it freed. A refusal of the task's input (or of
    a task it depends on) is returned as :class:`Refused`, not raised."""
    refused = next((a for a in args if isinstance(a, Refused)), None)
    if refused is not None:
        return refused
    try:
        return fn(*args)
    except VolrefError as exc:
        if isinstance(exc, OSError):  # a store that may come back: retried, then reported
            raise
        return Refused(exc)
    finally:
        release_free_memory()


def worker_address() -> str | None:
    """The Dask worker running the current task (None in this process)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return None
