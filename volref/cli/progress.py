"""Progress at the edge (observers, not inside the library): a rich bar on a terminal; on a log
(stderr not a terminal: a batch job, CI) one line every ``VOLREF_PROGRESS_INTERVAL`` seconds
(default 30) with blocks or tasks done / total, rate and ETA, and one line per finished stage."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dask.callbacks import Callback
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(console: Console, label: str, *middle: ProgressColumn) -> Progress:
    """A started rich bar on ``console``: label, bar, done / total, ``middle``, elapsed, ETA."""
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), *middle,
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   console=console)
    bar.start()
    return bar


INTERVAL_ENV = "VOLREF_PROGRESS_INTERVAL"


def log_interval() -> float:
    """Seconds between progress lines on a log (``VOLREF_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def status_line(label: str, unit: str, done: int, total: int, started: float,
                first: int = 0) -> str:
    """``label: done/total unit, rate, eta`` (the rate counts only work done in this run)."""
    elapsed = time.perf_counter() - started
    new = done - first
    rate = new / elapsed if elapsed > 0 else 0.0
    eta = duration((total - done) / rate) if rate > 0 else "unknown"
    return (f"{label}: {done}/{total} {unit}, {rate * 60:.1f} {unit}/min, "
            f"elapsed {duration(elapsed)}, eta {eta}")


class PeriodicLines:
    """Prints ``describe()`` on stderr every ``interval`` seconds from a background thread (a
    stage whose blocks take minutes still shows it is alive); None prints nothing."""

    def __init__(self, describe: Callable[[], str | None], interval: float | None = None) -> None:
        self.describe = describe
        self.interval = log_interval() if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="volref-progress", daemon=True)

    def start(self) -> PeriodicLines:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            line = self.describe()
            if line:
                print(line, file=sys.stderr, flush=True)


class DaskProgress(Callback):
    """Tasks done / total, rate and ETA for one ``dask.compute`` on the local scheduler.

    Drawn on stderr when it is a terminal; otherwise a single summary line at the end.
    """

    def __init__(self, description: str, enabled: bool = True) -> None:
        super().__init__()
        self.description = description
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._start = 0.0
        self._ntasks = 0
        self._done = 0
        self._lines: PeriodicLines | None = None

    def _start_state(self, dsk, state):
        self._ntasks = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._start = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            self._progress = progress_bar(self.console, "[bold]{task.description}",
                                          TextColumn("tasks"))
            self._task = self._progress.add_task(self.description, total=self._ntasks)
        elif self.enabled:
            self._lines = PeriodicLines(lambda: status_line(
                self.description, "tasks", self._done, self._ntasks, self._start)).start()

    def _posttask(self, key, result, dsk, state, worker_id):
        self._done = len(state["finished"])
        if self._progress is not None:
            self._progress.update(self._task, completed=self._done)

    def _finish(self, dsk, state, errored):
        if self._lines is not None:
            self._lines.stop()
        if self._progress is not None:
            self._progress.update(self._task, completed=len(state["finished"]))
            self._progress.stop()
        elif self.enabled and not errored:
            elapsed = time.perf_counter() - self._start
            print(f"{self.description}: {self._ntasks} tasks in {elapsed:.1f} s", file=sys.stderr)


@dataclass
class _Running:
    """A running stage: blocks done and in all, when it started, blocks done before then."""

    done: int
    total: int
    started: float
    first: int


class EngineProgress:
    """Blocks done / total, rate and ETA per stage, fed by the engine's observer events."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._lines: PeriodicLines | None = None
        self._lock = threading.Lock()
        self._state: dict[str, _Running] = {}
        self._header: str | None = None

    def header(self, line: str) -> None:
        """A line printed when the first stage starts (the cluster and its dashboard): a command
        refused while its stages are planned prints its one-line error and nothing else."""
        self._header = line

    def __enter__(self) -> EngineProgress:
        if self.enabled and self.console.is_terminal:
            self._progress = progress_bar(self.console, "[bold]{task.description:<22}",
                                          TextColumn("blocks"))
        elif self.enabled:
            self._lines = PeriodicLines(self.describe).start()
        return self

    def describe(self) -> str | None:
        """One line per running stage: blocks done / total, rate, ETA (None when idle)."""
        with self._lock:
            return "\n".join(status_line(stage, "blocks", r.done, r.total, r.started, r.first)
                             for stage, r in self._state.items()) or None

    def __call__(self, event: dict) -> None:
        stage = event["stage"]
        if self._header is not None and event["event"] == "start":
            if self.enabled:
                self.console.print(self._header, markup=False, highlight=False, soft_wrap=True)
            self._header = None
        with self._lock:
            if event["event"] == "start":
                self._state[stage] = _Running(event["done"], event["total"],
                                              time.perf_counter(), event["done"])
            elif event["event"] == "block" and stage in self._state:
                self._state[stage].done = event["done"]
            elif event["event"] == "end":
                self._state.pop(stage, None)
        if self._progress is not None:
            if event["event"] == "start":
                self._tasks[stage] = self._progress.add_task(
                    stage, total=event["total"], completed=event["done"])
            elif event["event"] == "block" and stage in self._tasks:
                self._progress.update(self._tasks[stage], completed=event["done"])
        elif self.enabled and event["event"] == "end" and "blocks" in event:
            print(f"{stage}: {event.get('computed', 0)} blocks computed, "
                  f"{event.get('skipped', 0)} already done, {event.get('failed', 0)} failed, "
                  f"{event.get('seconds', 0):.1f} s", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._lines is not None:
            self._lines.stop()
        if self._progress is not None:
            self._progress.stop()
