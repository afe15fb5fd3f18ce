"""A rich progress bar for Dask's local schedulers (an observer at the edge, not in the library)."""

from __future__ import annotations

import sys
import time

from dask.callbacks import Callback
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


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

    def _start_state(self, dsk, state):
        self._ntasks = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._start = time.perf_counter()
        if self.enabled and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("tasks"), TimeElapsedColumn(), TextColumn("eta"),
                TimeRemainingColumn(), console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self._ntasks)

    def _posttask(self, key, result, dsk, state, worker_id):
        if self._progress is not None:
            self._progress.update(self._task, completed=len(state["finished"]))

    def _finish(self, dsk, state, errored):
        if self._progress is not None:
            self._progress.update(self._task, completed=len(state["finished"]))
            self._progress.stop()
        elif self.enabled and not errored:
            elapsed = time.perf_counter() - self._start
            print(f"{self.description}: {self._ntasks} tasks in {elapsed:.1f} s", file=sys.stderr)
