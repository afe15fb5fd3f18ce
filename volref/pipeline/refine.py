"""``refine``: refinement of ``labels/volref-initial`` into ``labels/volref-refined``.

``method`` names an entry of the method registry (:mod:`volref.methods`): the MAE (default), or
one of the paper's baselines — ``mae-x`` (MAE with an image encoder: reads the image too),
``cnn-ae`` (convolutional denoising autoencoder: repaints whole tiles) or ``crf`` (dense CRF on
the ensemble's probabilities and the image: re-runs the ensemble that made the initial labels
over the block, since only labels and uncertainty are stored, and relabels each 128-px tile that
holds a removed patch). The entry says what the method reads and which block function of
:data:`BLOCKS` runs it.

Every block also counts what refinement changed (:mod:`volref.stages.changes`); the stage sums
the counts into a "do no harm" summary — the share of voxels changed and of the initial
mitochondrion voxels turned to background — that the run prints, records in the provenance and
warns about above a threshold.

Reads the initial labels and the uncertainty where ``segment`` wrote them (the image's archive or
``output``) — or, with ``labels``, a label image another tool wrote, mapped to volref's classes,
with its own uncertainty or the ensemble's (:mod:`volref.pipeline.inputs`) — and writes the
refined labels beside them, block by block. A block task reads its
block with ``context`` pixels around it (the tiles' reach plus the reach of the "near a
mitochondrion" test, on the tile grid), refines the tiles of the global grid that touch it, and
writes its own chunks::

       context ┌─────────────────────────┐
               │   tiles reaching in  ┌──┼──┐
               │   ┌─────────────┐    │  │  │   every tile touching the block is run (in
               │   │ block (kept)│    └──┼──┘   global z, y, x order, fixed batch shapes);
               │   └─────────────┘       │      blended probabilities kept inside the block
               └─────────────────────────┘
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
from volref.engine.grid import Block, BlockGrid
from volref.engine.manifest import Manifest
from volref.engine.runner import BlockTask, Executor, Observer, StageReport, worker_address
from volref.errors import ConfigError
from volref.io import (
    LabelInfo,
    Volume,
    create_label_image,
    label_levels,
    store_pyramid,
)
from volref.layout import INITIAL, REFINED, STAGE_OUTPUTS, existing_levels, label_path
from volref.methods import DEFAULT_METHOD, REGISTRY, Method
from volref.methods import method as method_spec
from volref.models.fusion import Fusion, read_fusion, smooth_tiles
from volref.models.registry import (
    DEFAULT_FUSION,
    DEFAULT_REFINER,
    DEFAULT_REFINERS,
    DEFAULT_SEGMENTER,
    load_refiner,
    load_segmenter,
    refiner_method,
    runs,
)
from volref.pipeline.blocks import MODEL_LOCK, Source, cached_model, device
from volref.pipeline.inputs import LabelsIn, UncertaintyIn, own_inputs, user_inputs
from volref.pipeline.intensity import volume_intensity
from volref.pipeline.stage import (
    Halo,
    StageContext,
    StagePlan,
    check_block_finite,
    check_finite,
    check_model,
    finish_stage,
    open_outputs,
    tasks_of,
)
from volref.pipeline.store import record_provenance
from volref.stages.changes import count_changes, summarise_changes
from volref.stages.crf import CRFSettings, crf_region
from volref.stages.normalise import IntensityRange, normalise
from volref.stages.refine import Combine, context, refine_region
from volref.stages.segment import segment_probabilities
from volref.stages.settings import LabelSettings, RefineSettings, SegmentSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineJob:
    initial: LabelsIn  # the labels refined, as volref's classes
    uncertainty: UncertaintyIn  # their normalised entropy
    refined: Source
    settings: RefineSettings
    model: tuple[str, str]  # the refiner (crf: the ensemble), path and sha256
    manifest: Manifest
    method: str = DEFAULT_METHOD
    image: Source | None = None  # methods that need the image read it
    intensity: IntensityRange | None = None  # as the segment stage normalised it
    segment: SegmentSettings | None = None  # crf: how the ensemble ran
    crf: CRFSettings = CRFSettings()
    halo: Halo = Halo()  # what a block task reads around its block (labels, uncertainty)
    #: methods that read the ensemble's probabilities: the ensemble (path, sha256); for crf
    #: the same as ``model``
    ensemble: tuple[str, str] | None = None
    fusion: Fusion | None = None  # fused: how the two models' probabilities combine

    @property
    def spec(self) -> Method:
        return REGISTRY[self.method]


#: crf: pixels of context around each tile (past the near-mitochondrion test's reach)
CRF_MARGIN = 32


def model_settings(model_key: tuple[str, str], settings: RefineSettings) -> RefineSettings:
    """The model decides the tile size; a stride that does not fit becomes half a tile."""
    tile = cached_model(load_refiner, *model_key, "cpu").config.tile
    if settings.tile == tile:
        return settings
    stride = settings.stride if settings.stride < tile else tile // 2
    try:
        return dataclasses.replace(settings, tile=tile, stride=stride)
    except ValueError as exc:
        raise ConfigError(f"stride {settings.stride} does not fit {tile}-pixel tiles: {exc}") \
            from None


@dataclass(frozen=True)
class RefineStage:
    """``method`` over every block (see the module doc)."""

    settings: RefineSettings = field(default_factory=RefineSettings)
    model: str | os.PathLike | None = None
    method: str | None = None  # None: fused, or mae for models the fusion was not fitted for
    segmenter: str | os.PathLike | None = None  # crf, fused: the ensemble that made the labels
    labels: LabelSettings = field(default_factory=LabelSettings)  # what is refined
    name: str = "refine"
    fusion: str | os.PathLike | None = None  # fused: the fusion file (default: the shipped one)

    @property
    def spec(self) -> Method:
        """The registry entry of the method that runs (:class:`~volref.errors.ConfigError` if
        unknown)."""
        return method_spec(self.chosen)

    def model_key(self) -> tuple[str, str]:
        """The checkpoint this method runs (crf: the ensemble), checked once."""
        if self.spec.model == "ensemble":
            return self.ensemble_key()
        return check_model(self.model, DEFAULT_REFINERS.get(self.chosen), load_refiner)

    @property
    def chosen(self) -> str:
        """The method that runs: ``method``, or by default ``fused`` when the fusion fits the
        ensemble and MAE in use, else the paper's ``mae`` (with a warning)."""
        if self.method is not None:
            return self.method
        return default_method(*(None if p is None else str(p)
                                for p in (self.model, self.segmenter, self.fusion)))

    def ensemble_key(self) -> tuple[str, str]:
        """The ensemble whose probabilities crf and fused read, checked once."""
        return check_model(self.segmenter, DEFAULT_SEGMENTER, load_segmenter)

    def effective_settings(self) -> RefineSettings:
        """The settings blocks run with: the model decides the tile size (crf: as given)."""
        if self.spec.model == "ensemble":
            return self.settings
        return model_settings(self.model_key(), self.settings)

    def align(self) -> int:
        return self.effective_settings().tile

    def halo(self, settings: RefineSettings, model_key: tuple[str, str]) -> Halo:
        """The tiles' reach plus the near-mitochondrion test's, on the tile grid (crf: its
        margin); in y and x only."""
        if self.spec.block == "crf":
            return Halo.around(0, CRF_MARGIN)
        patch = cached_model(load_refiner, *model_key, "cpu").config.patch
        return Halo.around(0, context(settings, patch))

    def plan(self, ctx: StageContext) -> StagePlan:
        """Check the method's model against the segment record, open or resume the refined
        labels, and list the block tasks."""
        method, vol, root, grid = self.chosen, ctx.vol, ctx.root, ctx.grid
        spec = self.spec
        meta = ctx.meta
        byo = self.labels.labels is not None
        if byo and spec.model == "ensemble":  # it relabels from the ensemble alone
            others = [m.name for m in REGISTRY.values() if m.model != "ensemble"]
            raise ConfigError(f"--method {method} refines the probabilities of the ensemble "
                              f"that made {label_path(INITIAL)}: refine another tool's labels "
                              f"(--labels) with {', '.join(others[:-1])} or {others[-1]}")
        initial, unc, inputs = user_inputs(ctx, self.labels) if byo else own_inputs(ctx)
        upstream = Manifest(meta, "segment")
        made_with = upstream.settings() if upstream.done else {}
        settings = self.settings
        model_key = self.model_key()
        ensemble = model_key if spec.model == "ensemble" else None
        if spec.probabilities and ensemble is None:  # a tile refiner that reads them too
            ensemble = self.ensemble_key()
        if ensemble is not None and not byo \
                and made_with.get("model_sha256") not in (None, ensemble[1]):
            if spec.model == "ensemble":
                raise ConfigError(f"--method {method} refines the probabilities of the "
                                  f"ensemble that made {label_path(INITIAL)}; {ensemble[0]} is "
                                  "another one (pass that ensemble with --segmenter)")
            raise ConfigError(f"--method {method} combines the MAE with the probabilities of the "
                              f"ensemble that made {label_path(INITIAL)}; {ensemble[0]} "
                              "is another one (pass that ensemble with --segmenter, and a "
                              "fusion fitted for it with --fusion)")
        if spec.block == "crf" and any(b % settings.tile for b in grid.block[1:]):
            raise ConfigError(f"--method {method} relabels {settings.tile}-px tiles: the "
                              f"block's y and x ({grid.block[1]}, {grid.block[2]}) must be "
                              "multiples of it")
        if spec.model != "ensemble":
            model = cached_model(load_refiner, *model_key, "cpu")
            if not runs(spec, model):
                raise ConfigError(f"{model_key[0]} is a {refiner_method(model)} model, not "
                                  f"{method}")
            settings = model_settings(model_key, settings)
        fusion = None
        if spec.block == "fused" and ensemble is not None:
            fusion = fusion_for(self.fusion, ensemble, model_key)
        needs_image = spec.image
        intensity = None
        if needs_image and "intensity" in made_with:
            intensity = IntensityRange(**made_with["intensity"])
        elif needs_image and byo:  # no segment here: normalise as segment would
            intensity = volume_intensity(vol, self.segmenter, SegmentSettings(), check_finite)[0]
        elif needs_image:
            raise ConfigError(f"--method {method} reads the image normalised as segment did, but "
                              "the segment record holds no intensity range: run volref segment "
                              "again")
        ms = vol.multiscale
        record = {**inputs, "model_sha256": model_key[1], "settings": settings.to_dict(),
                  "method": method}
        if byo and intensity is not None:  # plain refine: covered by the segment digest
            record["intensity"] = intensity.to_dict()
        if spec.block == "crf":
            record["crf"] = CRFSettings().to_dict()
        if ensemble is not None and ensemble != model_key:
            record["segmenter_sha256"] = ensemble[1]
        if fusion is not None:
            record["fusion"] = fusion.to_dict()
        manifest = Manifest(meta, self.name)

        def create(over: bool) -> list[zarr.Array]:
            return create_label_image(root, REFINED, label_levels(ms, "uint8"), ms.axes,
                                      version=ms.version,
                                      info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                      overwrite=over)[1]

        arrays, resumed = open_outputs(ctx, manifest, record, create,
                                       lambda: existing_levels(root, label_path(REFINED)))
        record_provenance(root, self.name, {"model": model_key[0], **record})
        halo = self.halo(settings, model_key)
        job = RefineJob(initial, unc, ctx.source(arrays[0]),
                        settings, model_key, manifest, method=method,
                        image=ctx.image() if needs_image else None,
                        intensity=intensity,
                        segment=SegmentSettings.from_dict(made_with.get("settings", {}))
                        if spec.probabilities else None, halo=halo, ensemble=ensemble,
                        fusion=fusion)
        return StagePlan(job, tasks_of(grid, refine_block, job, halo, gpu=True), manifest,
                         [store_pyramid(None, arrays, "nearest")], resumed)

    def run(self, ctx: StageContext, executor: Executor,
            observer: Observer | None = None) -> StageReport:
        """Plan, run the blocks, then sum what they changed into ``results["changes"]`` (see
        :func:`~volref.stages.changes.summarise_changes`), recorded in the provenance; its
        warning, if any, is logged."""
        plan = self.plan(ctx)
        report = finish_stage(executor, ctx, plan, observer)
        keys = {t.key for t in plan.tasks}
        changes = summarise_changes({k: v for k, v in report.results.items() if k in keys})
        report.results["changes"] = changes
        if changes["warning"]:
            log.warning("%s", changes["warning"])
        prov = dict(ctx.meta.attrs.get("volref", {}).get("provenance", {}).get(self.name, {}))
        prov.pop("volref", None)
        record_provenance(ctx.root, self.name, {**prov, "changes": changes})
        return report


def plan_refine(vol: Volume, root: zarr.Group, grid: BlockGrid, *,
                model: str | os.PathLike | None = None, settings: RefineSettings | None = None,
                overwrite: bool = False, method: str | None = None,
                segmenter: str | os.PathLike | None = None,
                labels: LabelSettings | None = None
                ) -> tuple[RefineJob, list[BlockTask], StagePlan]:
    """:meth:`RefineStage.plan` as a function (job, tasks, plan), for scripts."""
    plan = RefineStage(settings or RefineSettings(), model, method, segmenter,
                       labels or LabelSettings()).plan(StageContext(vol, root, grid, overwrite))
    return plan.job, plan.tasks, plan


#: what a block function returns: the block's initial labels, its refined labels (same shape)
#: and its stats for the manifest
BlockResult = tuple[np.ndarray, np.ndarray, dict[str, Any]]


def refine_block(job: RefineJob, block: Block) -> dict[str, Any]:
    """Refine one block with its method's block function (:data:`BLOCKS`), write its chunks,
    count what changed, then record it. Returns tile counts, change counts and timings."""
    start = time.perf_counter()
    initial, refined, stats = BLOCKS[job.spec.block](job, block)
    written = job.refined.write(block, refined)
    stats["chunks"] = {STAGE_OUTPUTS["refine"][0]: written}
    stats["changes"] = count_changes(initial, refined)
    stats.update(seconds=round(time.perf_counter() - start, 3), worker=worker_address())
    job.manifest.record(block.key, stats)
    return stats


def _core(labels: np.ndarray, lo: tuple[int, ...], block: Block,
          shape: tuple[int, ...]) -> np.ndarray:
    """The block's own voxels of ``labels`` read from ``lo`` (the block plus its halo)."""
    return labels[tuple(slice(b - a, b - a + n) for a, b, n in zip(lo, block.start, shape))]


def _tiles_block(job: RefineJob, block: Block, combine: Combine | None = None,
                 prepare: Callable[[np.ndarray], None] | None = None,
                 rim_rule: bool = False) -> BlockResult:
    """A tile refiner (the MAE, MAE+X, the CNN-AE) over the global tile grid on one block:
    :func:`~volref.stages.refine.refine_region` (``combine``, ``prepare``, ``rim_rule``: as
    its)."""
    dev = device()
    model = cached_model(load_refiner, *job.model, dev)
    lo, hi = job.halo.region(block)
    labels = job.initial.read(lo, hi)
    unc = job.uncertainty.read(lo, hi)
    image = None
    if getattr(model, "needs_image", False) and job.image is not None \
            and job.intensity is not None:
        raw = job.image.read(lo, hi, "mirror")
        check_block_finite(raw, lo, block)
        image = normalise(raw, job.intensity)
    with MODEL_LOCK:
        out = refine_region(model, labels, unc, job.settings, device=dev, image=image,
                            combine=combine, prepare=prepare, rim_rule=rim_rule)
    stats = {"tiles": out.tiles_total, "tiles_run": out.tiles_run,
             "removed_px": int(out.removed.sum()), "device": dev}
    return _core(labels, lo, block, out.labels.shape), out.labels, stats


def _fused_block(job: RefineJob, block: Block) -> BlockResult:
    """``--method fused`` on one block: the MAE as :func:`_tiles_block`, each pixel it rebuilds
    given its class by :func:`fused_classes` (the image is read for the ensemble only)."""
    prepare, combine = fused_classes(job, block, device())
    return _tiles_block(job, block, combine=combine, prepare=prepare,
                        rim_rule=cast(Fusion, job.fusion).rim)


def _crf_block(job: RefineJob, block: Block) -> BlockResult:
    """``--method crf`` on one block: the ensemble's probabilities over the block plus the CRF's
    margin, computed on the segment stage's global tile grid (so they equal what segment saw),
    then :func:`~volref.stages.crf.crf_region`."""
    s, m = job.settings, job.halo.before[1]
    dev = device()
    lo, hi = job.halo.region(block)  # the CRF's margin
    labels = job.initial.read(lo, hi)
    unc = job.uncertainty.read(lo, hi)
    probs, image = ensemble_probabilities(job, job.model, block, m, dev)
    out = crf_region(probs, image, labels, unc, tile=s.tile,
                     margin=m, tau=s.tau, near_px=s.near_px, settings=job.crf)
    stats = {"tiles": out.shape[0] * -(-out.shape[1] // s.tile) * -(-out.shape[2] // s.tile),
             "device": dev}
    return _core(labels, lo, block, out.shape), out, stats


#: the block function of each ``block`` kind of the method registry (:mod:`volref.methods`)
BLOCKS: dict[str, Callable[[RefineJob, Block], BlockResult]] = {
    "tiles": _tiles_block, "fused": _fused_block, "crf": _crf_block}


def ensemble_input(job: RefineJob, block: Block, margin: int) -> tuple[np.ndarray, int, int]:
    """The normalised image the ensemble reads for the block plus ``margin`` px in y and x, on
    the segment stage's global tile grid (one slice and the halo around it), and the grid
    origin ``(ys, xs)`` of that stack."""
    seg, m = job.segment, margin
    if seg is None or job.image is None or job.intensity is None:  # RefineStage.plan sets them
        raise RuntimeError(f"a {job.method} job needs the segment settings, the image and its "
                           "intensity")
    (z0, y0, x0), (z1, y1, x1) = block.start, block.stop
    t, h = seg.tile, seg.halo
    ys, xs = (y0 - m) // t * t, (x0 - m) // t * t  # on the ensemble's tile grid
    ye, xe = -(-(y1 + m) // t) * t, -(-(x1 + m) // t) * t
    raw = job.image.read((z0 - 1, ys - h, xs - h), (z1 + 1, ye + h, xe + h), "mirror")
    check_block_finite(raw, (z0 - 1, ys - h, xs - h), block)
    return normalise(raw, job.intensity), ys, xs


def ensemble_probabilities(job: RefineJob, model: tuple[str, str], block: Block, margin: int,
                           dev: str) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's class probabilities ``(nz, C, Y, X)`` over the block plus ``margin`` px in
    y and x, and the normalised image there: computed on the segment stage's global tile grid,
    so they equal what segment saw whatever the block."""
    stack, ys, xs = ensemble_input(job, block, margin)  # refuses a job without segment settings
    seg = cast(SegmentSettings, job.segment)
    m, h = margin, seg.halo
    (_, y0, x0), (_, y1, x1) = block.start, block.stop
    ens = cached_model(load_segmenter, *model, dev)
    with MODEL_LOCK:
        probs = segment_probabilities(ens, stack, seg, device=dev)
    win = (slice(y0 - m - ys, y1 + m - ys), slice(x0 - m - xs, x1 + m - xs))
    image = stack[1:-1, h:-h, h:-h][(slice(None),) + win]
    return probs[(slice(None), slice(None)) + win], image


def fused_classes(job: RefineJob, block: Block,
                  dev: str) -> tuple[Callable[[np.ndarray], None], Combine]:
    """``--method fused``: ``prepare``, which runs the ensemble once over the block's tiles that
    hold a removed pixel (all slices in one pass, so its batches are full; a tile's values do
    not depend on which others run), and ``combine``, the rule that gives each pixel the MAE
    rebuilds its class from the ensemble's probabilities (and their :func:`smooth_tiles`, on the
    ensemble's global tile grid) and the MAE's (:mod:`volref.models.fusion`)."""
    if job.ensemble is None or job.fusion is None or job.segment is None:  # set by plan
        raise RuntimeError("a fused job needs the ensemble, the fusion and the segment settings")
    stack, ys, xs = ensemble_input(job, block, 0)
    ens = cached_model(load_segmenter, *job.ensemble, dev)
    fusion, seg = job.fusion, job.segment
    t, (_, y0, x0) = seg.tile, block.start
    oy, ox = y0 - ys, x0 - xs  # the block in the stack's grid
    _, *extent = cast(Source, job.image).shape  # the volume: the last tiles stop there
    probs: list[np.ndarray] = []

    def prepare(removed: np.ndarray) -> None:
        # the caller (refine_region, under MODEL_LOCK) passes the core's removed pixels
        grid = np.zeros((removed.shape[0], stack.shape[1] - 2 * seg.halo,
                         stack.shape[2] - 2 * seg.halo), bool)
        grid[:, oy:oy + removed.shape[1], ox:ox + removed.shape[2]] = removed
        needed = grid.reshape(grid.shape[0], grid.shape[1] // t, t, grid.shape[2] // t, t)
        tiles = np.asarray(needed.any(axis=(2, 4)))
        probs.append(segment_probabilities(ens, stack, seg, device=dev, needed=tiles))
        if fusion.smooth > 0:
            probs.append(smooth_tiles(probs[0], fusion.smooth, t, origin=(ys, xs),
                                      extent=(extent[0], extent[1]), needed=tiles))

    def combine(z: int, sel: np.ndarray, refiner: np.ndarray) -> np.ndarray:
        p, s = (a[z, :, oy:oy + sel.shape[0], ox:ox + sel.shape[1]][:, sel] for a in
                (probs[0], probs[-1]))
        return fusion.classes(p, refiner, s if fusion.smooth > 0 else None)

    return prepare, combine


def fusion_for(path: str | os.PathLike | None, ensemble: tuple[str, str],
               refiner: tuple[str, str]) -> Fusion:
    """The fusion in ``path`` (default: the shipped one), refused when it was fitted for other
    models than the ensemble and MAE that run."""
    path = Path(path) if path is not None else DEFAULT_FUSION
    try:
        fusion, card = read_fusion(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for what, key, (model_path, sha) in (("ensemble", "segmenter_sha256", ensemble),
                                          ("MAE", "refiner_sha256", refiner)):
        if card.get(key) not in (None, sha):
            raise ConfigError(f"{path} was fitted for another {what} than {model_path}: fit one "
                              f"for it (volref train fusion --{'segmenter' if what == 'ensemble' else 'refiner'} "
                              f"{model_path})")
    return fusion


@functools.lru_cache(maxsize=16)
def default_method(model: str | None, segmenter: str | None, fusion: str | None) -> str:
    """``fused`` when the fusion (default: the shipped one) was fitted for this ensemble and
    MAE; else the paper's ``mae``, with a warning that says why and how to fit one. A fusion
    file the user names (``fusion``) that cannot be used is an error, never a quiet switch."""
    try:
        fusion_for(fusion, check_model(segmenter, DEFAULT_SEGMENTER, load_segmenter),
                   check_model(model, DEFAULT_REFINER, load_refiner))
    except ConfigError as exc:
        if fusion is not None:
            raise
        log.warning("refining with the paper's MAE (--method mae), not the default fused "
                    "refinement: %s", exc)
        return "mae"
    return DEFAULT_METHOD
