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
            self._progress = progress_bar(self.console, "[bold]{task.description}",
                                          TextColumn("tasks"))
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


class EngineProgress:
    """Blocks done / total, rate and ETA per stage, fed by the engine's observer events."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> EngineProgress:
        if self.enabled and self.console.is_terminal:
            self._progress = progress_bar(self.console, "[bold]{task.description:<22}",
                                          TextColumn("blocks"))
        return self

    def __call__(self, event: dict) -> None:
        stage = event["stage"]
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
        if self._progress is not None:
            self._progress.stop()
