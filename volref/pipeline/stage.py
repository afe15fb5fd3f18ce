"""The stage protocol: plan -> block tasks with declared read and write regions -> finish.

Every stage of a run (segment, refine, instances, measure) is an object with a ``name``, the tile
size its blocks must align to (``align``), and ``run(ctx, executor, observer)``. Block stages
also ``plan``: open (or resume) their outputs, write their manifest's settings record and list
one :class:`~volref.engine.runner.BlockTask` per block; ``run`` then runs the unfinished ones and
finishes (pyramid levels, then the stage's ``done`` record). :func:`volref.pipeline.run.run`
loops over a list of stages; :func:`~volref.pipeline.run.run_block` calls one planned task here.

A block task writes exactly its block and reads its block plus a :class:`Halo` the stage works
out once from its settings when it plans::

      read  ┌───────────────────────────┐   start - before
            │     ┌───────────────┐     │
            │     │ block (write) │ →→→ │   stop rounded up to ``align`` (whole tiles)
            │     └───────────────┘     │
            └───────────────────────────┘   + after

Helpers every stage shares live here too: checking a model once before any block, reading the
manifest of the stage before, opening or resuming outputs, finishing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import zarr

from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, run_blocks
from volref.errors import ImageDataError, OutputExistsError, VolrefError
from volref.io import Volume
from volref.layout import META
from volref.models.registry import file_hash
from volref.pipeline.blocks import Source, cached_model

Box = tuple[tuple[int, int, int], tuple[int, int, int]]


@dataclass(frozen=True)
class Halo:
    """The context a block task reads around its block (z, y, x): ``before`` the block's start,
    ``after`` its stop rounded up to a multiple of ``align`` (whole tiles past the volume)."""

    before: tuple[int, int, int] = (0, 0, 0)
    after: tuple[int, int, int] = (0, 0, 0)
    align: tuple[int, int, int] = (1, 1, 1)

    @classmethod
    def around(cls, z: int, yx: int, align: int = 1) -> Halo:
        """``z`` slices and ``yx`` pixels on every side; y and x rounded to ``align``."""
        return cls((z, yx, yx), (z, yx, yx), (1, align, align))

    def region(self, block: Block) -> Box:
        """The box ``[start, stop)`` a task reads for ``block`` (may reach past the volume)."""
        start = tuple(a - h for a, h in zip(block.start, self.before))
        stop = tuple(a + -(-(b - a) // n) * n + h
                     for a, b, n, h in zip(block.start, block.stop, self.align, self.after))
        return start, stop  # type: ignore[return-value]


@dataclass(frozen=True)
class StageContext:
    """What every stage of a run works on: the image, the store written into, the block grid."""

    vol: Volume
    root: zarr.Group
    grid: BlockGrid
    overwrite: bool = False

    @property
    def meta(self) -> zarr.Group:
        """The store's ``volref`` group (manifests, tables, provenance)."""
        return self.root.require_group(META)

    @property
    def lead(self) -> tuple[int, ...]:
        """Index of the leading (t, c) axes of the arrays volref writes (all 0)."""
        return (0,) * (self.vol.multiscale.ndim - 3)

    def image(self) -> Source:
        """The image's level and selected channel/time point, as a 3-D source."""
        ms = self.vol.multiscale
        return Source(self.vol.group[ms.levels[self.vol.level].path],
                      tuple(self.vol.selection[a.name] for a in ms.axes[:ms.ndim - 3]))

    def source(self, array: zarr.Array) -> Source:
        """A written array (levels of a label image, uncertainty) as a 3-D source."""
        return Source(array, self.lead)


@dataclass
class StagePlan:
    """A planned block stage: its job (shared by the tasks), tasks, and the lazy finishing work."""

    job: Any
    tasks: list[BlockTask]
    manifest: Manifest
    pyramids: list[Any]
    resumed: bool = False


class Stage(Protocol):
    """One stage of a run."""

    @property
    def name(self) -> str:
        """The stage's name (its manifest, its report); read-only, as on the frozen stages."""
        ...

    def align(self) -> int:
        """Pixels in y and x a block of this stage must be a multiple of (1: any)."""
        ...

    def run(self, ctx: StageContext, executor: Executor,
            observer: Observer | None = None) -> StageReport:
        """Compute what is not finished yet and finish; returns the stage's report."""
        ...


def tasks_of(grid: BlockGrid, fn: Callable[..., Any], job: Any, halo: Halo,
             gpu: bool = False) -> list[BlockTask]:
    """One task per block of ``grid``: ``fn(job, block)``, reading ``halo`` around it."""
    return [BlockTask(b.key, fn, (job, b), gpu=gpu, reads=halo.region(b),
                      writes=(b.start, b.stop)) for b in grid]


# ---------------------------------------------------------------- shared by the stages


def check_model(model: str | os.PathLike | None, default: Any, loader: Any) -> tuple[str, str]:
    """Path and hash of a checkpoint, loaded once here so a bad file fails before any block."""
    path = str(model or default)
    digest = file_hash(path)
    cached_model(loader, path, digest, "cpu")
    return path, digest


def check_finite(data: np.ndarray, where: str) -> None:
    """Refuse NaN or Inf intensities (they would poison normalisation and the models)."""
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise ImageDataError(f"the image has NaN or Inf intensities ({bad} voxels in {where}); "
                                 "volref needs finite values: fix or mask them first")


def require_done(meta: zarr.Group, stage: str, what: str, command: str) -> Manifest:
    """The manifest of an earlier stage, which must have finished here."""
    manifest = Manifest(meta, stage)
    if not manifest.done:
        raise VolrefError(f"{what} missing or unfinished here: run volref {command} first "
                          "(with the same --output)")
    return manifest


def open_outputs(manifest: Manifest, settings: dict[str, Any], overwrite: bool,
                 create: Callable[[bool], list[Any]],
                 reopen: Callable[[], list[Any] | None]) -> tuple[list[Any], bool]:
    """The output arrays of a stage and whether they resume an earlier run.

    Same digest as recorded -> reopen and resume. Otherwise create them: over earlier results
    only with ``overwrite`` (a different digest is refused by the manifest, outputs written
    without a manifest by :class:`OutputExistsError`).
    """
    same = manifest.settings_digest() is not None and not overwrite
    manifest.begin(settings, overwrite)  # raises on other settings without overwrite
    if same:
        arrays = reopen()
        if arrays is not None:
            return arrays, True
        manifest.begin(settings, overwrite=True)  # records without outputs: start again
    try:
        arrays = create(overwrite)
    except OutputExistsError:
        manifest.clear()
        raise
    return arrays, False


def finish_stage(executor: Executor, stage: str, plan: StagePlan,
                 observer: Observer | None) -> StageReport:
    """Run the blocks not yet recorded, then the pyramid levels, then mark the stage done."""
    manifest = plan.manifest
    report = run_blocks(executor, stage, plan.tasks, manifest.finished(), observer)
    if report.computed or not manifest.done:
        start = time.perf_counter()
        executor.compute(plan.pyramids)
        report.seconds += time.perf_counter() - start
        manifest.mark_done(report.to_dict())
    return report


def run_planned(plan: StagePlan, block: Block) -> Any:
    """Run ``block``'s task of a planned stage here, in this process (for debugging)."""
    task = next(t for t in plan.tasks if t.key == block.key)
    return task.fn(*task.args)

