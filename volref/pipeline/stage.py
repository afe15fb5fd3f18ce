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

What a stage records covers its inputs' content, and what it resumes is checked:

* the image: ``segment`` records the fingerprint of the image levels it reads (a listing: sizes
  and modification times or ETags, :mod:`volref.io.fingerprint`) with its settings, so a run
  on a changed image is refused, never mixed; every later stage compares the image's current
  fingerprint with that record (:func:`check_image`), so nothing is extended from an image that
  changed after ``segment`` finished;
* the stages' own outputs: each block record lists the chunks its block wrote, and a resumed
  stage recomputes the blocks whose chunks went missing and rebuilds a pyramid whose listing
  changed (:func:`open_outputs`); a stage reading another stage's outputs refuses them in one
  line when chunks are missing (:func:`require_done`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import zarr

from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest, image_change
from volref.engine.outputs import level_listing, missing_blocks, stale_levels
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, run_blocks
from volref.errors import ConfigError, ImageDataError, OutputExistsError, VolrefError
from volref.io import Volume
from volref.io.fingerprint import array_fingerprint
from volref.layout import META, STAGE_OUTPUTS
from volref.models.registry import file_hash
from volref.pipeline.blocks import Source, cached_model

log = logging.getLogger(__name__)

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

    @cached_property
    def image_fingerprint(self) -> dict[str, Any]:
        """Fingerprints of the image levels the stages read (the processed level and the
        coarsest, whose sample sets the intensity range), by level path; one listing per run."""
        ms = self.vol.multiscale
        paths = dict.fromkeys([ms.levels[self.vol.level].path, ms.levels[-1].path])
        return {p: array_fingerprint(self.vol.group[p]) for p in paths}

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
            raise ImageDataError(f"the image has NaN or Inf intensities ({bad} "
                                 f"voxel{'s' if bad > 1 else ''} in {where}); "
                                 "volref needs finite values: fix or mask them first")


def check_block_finite(raw: np.ndarray, lo: tuple[int, ...], block: Block) -> None:
    """Refuse NaN or Inf intensities in what a block task read (``raw``, from ``lo``): counted
    in the block's own voxels (its margin mirrors or overlaps them), or, when only its margin
    holds them, said so (the neighbouring block counts them)."""
    if raw.dtype.kind != "f" or np.isfinite(raw).all():
        return
    own = raw[tuple(slice(s - o, e - o) for s, e, o in zip(block.start, block.stop, lo))]
    check_finite(own, f"block {block.key}")
    raise ImageDataError(f"the image has NaN or Inf intensities (in the margin block {block.key} "
                         "reads around it); volref needs finite values: fix or mask them first")


def require_done(ctx: StageContext, stage: str, what: str, command: str) -> Manifest:
    """The manifest of an earlier stage, which must have finished here from the image as it is
    now, with every chunk it wrote still stored."""
    manifest = Manifest(ctx.meta, stage)
    if not manifest.done:
        raise VolrefError(f"{what} missing or unfinished here: run volref {command} first "
                          "(with the same --output)")
    outputs = STAGE_OUTPUTS.get(stage, ())
    lost = missing_blocks(ctx.root, manifest.finished(), outputs)
    stale = stale_levels(ctx.root, manifest.done_record().get("levels"), outputs)
    if lost or stale:
        chunks = f"{sum(lost.values())} chunk(s) of {len(lost)} block(s)" if lost \
            else "chunks of its coarser levels"
        raise VolrefError(f"{' and '.join(outputs)} lost {chunks} that volref {command} wrote "
                          f"(deleted?); run volref {command} again (with the same --output) to "
                          "recompute them")
    check_image(ctx)
    return manifest


def check_image(ctx: StageContext) -> None:
    """Refuse to go on from results that ``segment`` made from another image: the image's
    fingerprint now must be the one recorded when it ran."""
    recorded = Manifest(ctx.meta, "segment").settings().get("inputs")
    if not isinstance(recorded, dict) or "image" not in recorded:
        return  # results made before fingerprints (or not by segment): nothing to compare
    if recorded["image"] != ctx.image_fingerprint:
        change = image_change(recorded, {"image": ctx.image_fingerprint})
        raise ConfigError(f"the image changed since volref segment made its labels here "
                          f"({change}); run volref segment --overwrite, then the later stages "
                          "with --overwrite")


def open_outputs(ctx: StageContext, manifest: Manifest, settings: dict[str, Any],
                 create: Callable[[bool], list[Any]],
                 reopen: Callable[[], list[Any] | None]) -> tuple[list[Any], bool]:
    """The output arrays of a stage and whether they resume an earlier run.

    Same digest as recorded -> reopen and resume: finished blocks whose chunks are no longer
    stored lose their records (they run again), and a pyramid whose listing changed makes the
    stage unfinished (it is rebuilt). Otherwise create them: over earlier results only with
    ``overwrite`` (a different digest is refused by the manifest, outputs written without a
    manifest by :class:`OutputExistsError`).
    """
    overwrite = ctx.overwrite
    same = manifest.settings_digest() is not None and not overwrite
    manifest.begin(settings, overwrite)  # raises on other settings without overwrite
    if same:
        arrays = reopen()
        if arrays is not None:
            repair_outputs(ctx.root, manifest)
            return arrays, True
        manifest.begin(settings, overwrite=True)  # records without outputs: start again
    try:
        arrays = create(overwrite)
    except OutputExistsError:
        manifest.clear()
        raise
    return arrays, False


def repair_outputs(root: zarr.Group, manifest: Manifest) -> None:
    """Before a stage resumes: forget the finished blocks whose chunks are missing, and mark the
    stage unfinished when its coarser levels lost chunks (see :mod:`volref.engine.outputs`)."""
    outputs = STAGE_OUTPUTS.get(manifest.stage, ())
    lost = missing_blocks(root, manifest.finished(), outputs)
    if lost:
        log.warning("%s: %d chunk(s) of %s are missing; recomputing %d block(s)", manifest.stage,
                    sum(lost.values()), " and ".join(outputs), len(lost))
        manifest.forget(sorted(lost))
    stale = stale_levels(root, manifest.done_record().get("levels"), outputs)
    if stale:
        log.warning("%s: the coarser levels of %s lost chunks; rebuilding them", manifest.stage,
                    " and ".join(stale))
        manifest.undo()


def mark_finished(root: zarr.Group, manifest: Manifest, summary: dict[str, Any]) -> None:
    """The stage's ``done`` record, with the listing of its outputs' coarser levels."""
    outputs = STAGE_OUTPUTS.get(manifest.stage, ())
    manifest.mark_done({**summary, "levels": level_listing(root, outputs)})


def finish_stage(executor: Executor, ctx: StageContext, plan: StagePlan,
                 observer: Observer | None) -> StageReport:
    """Run the blocks not yet recorded, then the pyramid levels, then mark the stage done."""
    manifest = plan.manifest
    report = run_blocks(executor, manifest.stage, plan.tasks, manifest.finished(), observer)
    if report.computed or not manifest.done:
        start = time.perf_counter()
        executor.compute(plan.pyramids)
        report.seconds += time.perf_counter() - start
        mark_finished(ctx.root, manifest, report.to_dict())
    return report


def run_planned(plan: StagePlan, block: Block) -> Any:
    """Run ``block``'s task of a planned stage here, in this process (for debugging)."""
    task = next(t for t in plan.tasks if t.key == block.key)
    return task.fn(*task.args)

