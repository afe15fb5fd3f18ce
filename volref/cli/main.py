"""The ``volref`` command. Thin: parses options, calls the API, prints results.

User mistakes (:class:`~volref.errors.VolrefError`) print one line and exit 2; anything else
is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import click
import dask

from volref import __version__
from volref.classes import counted, mitochondria
from volref.cli.info import describe
from volref.cli.labels import label_options, label_settings
from volref.cli.progress import DaskProgress, EngineProgress
from volref.errors import SettingsError, VolrefError
from volref.layout import METRICS_CSV_PATH
from volref.methods import DEFAULT_METHOD, REGISTRY, help_text, table_order
from volref.pipeline.settings import RunSettings
from volref.settings import PRECISIONS, default_of
from volref.stages.changes import change_lines
from volref.stages.settings import BLENDS, METHODS, RefineSettings, SegmentSettings
from volref.synth.config import NOISE_RANGE, VOXEL_UM_RANGE, SynthConfig

log = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="volref")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Refine mitochondria segmentations in OME-Zarr z-stacks."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Scrub) for f in handler.filters):
            handler.addFilter(_Scrub())
    # Dask's loggers keep their own INFO level; show their chatter only with -vv. distributed
    # sets its levels from the Dask config when it is first imported (in this process and in
    # every worker it spawns), so the level goes into the config as well as onto the loggers.
    dask_level = "debug" if verbose >= 2 else "warning"
    dask.config.set({"distributed.logging": {"distributed": dask_level,
                                             "distributed.client": dask_level,
                                             "bokeh": "error", "tornado": "critical"}})
    for name in ("distributed", "dask_cuda"):
        logging.getLogger(name).setLevel(dask_level.upper())
    ctx.obj = {"progress": not quiet}


@cli.command()
@click.argument("out", type=str)
@click.option("--shape", nargs=3, type=click.IntRange(min=1),
              default=default_of(SynthConfig, "shape"),
              show_default=True, help="Volume shape Z Y X in voxels.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=default_of(SynthConfig, "seed"),
              show_default=True,
              help="Random seed: the same seed and settings give the same voxels.")
@click.option("--chunks", nargs=3, type=click.IntRange(min=1),
              default=default_of(SynthConfig, "chunks"),
              show_default=True, help="Chunk shape Z Y X of every stored array.")
@click.option("--density", type=click.FloatRange(min=0), default=default_of(SynthConfig, "density"),
              show_default=True,
              help="Mitochondria per million voxels.")
@click.option("--degraded-fraction", type=click.FloatRange(0, 1),
              default=default_of(SynthConfig, "degraded_fraction"),
              show_default=True, help="Fraction of mitochondria with a low-SNR area.")
@click.option("--degraded-length", nargs=2, type=click.FloatRange(min=0),
              default=default_of(SynthConfig, "degraded_length_px"),
              show_default=True, help="Range of a low-SNR area's length along the skeleton (px); "
                                      "the area also spans the mitochondrion's width.")
@click.option("--noise", type=click.FloatRange(*NOISE_RANGE),
              default=default_of(SynthConfig, "noise"),
              show_default=True, help="Noise level (2 = a quarter of the photons).")
@click.option("--voxel-size", nargs=3, type=click.FloatRange(*VOXEL_UM_RANGE),
              default=default_of(SynthConfig, "voxel_size_um"), show_default=True,
              help="Voxel size Z Y X in µm.")
@click.option("--levels", type=click.IntRange(min=1), default=None,
              help="Pyramid levels (default: until y or x < 256).")
@click.option("--ngff", type=click.Choice(["0.4", "0.5"]), default="0.5", show_default=True,
              help="OME-Zarr version: 0.5 (zarr v3) or 0.4 (zarr v2).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def synth(ctx, out, shape, seed, chunks, density, degraded_fraction, degraded_length, noise,
          voxel_size, levels, ngff, overwrite):
    """Write a phantom pan-ExM z-stack with ground truth to OUT (an OME-Zarr store)."""
    from volref.pipeline import write_phantom
    from volref.synth import SynthConfig

    config = SynthConfig(shape=shape, seed=seed, chunks=chunks, density=density,
                         degraded_fraction=degraded_fraction,
                         degraded_length_px=degraded_length, noise=noise, voxel_size_um=voxel_size)
    start = time.perf_counter()
    work = write_phantom(config, out, version=ngff, levels=levels, overwrite=overwrite)
    _compute(work, "synth", ctx.obj["progress"])
    n = phantom_count(out)
    click.echo(f"wrote {out} ({' x '.join(map(str, shape))} voxels, seed {seed}, "
               f"{mitochondria(n)}) in {time.perf_counter() - start:.1f} s")
    if n == 0:
        mvox = math.prod(shape) / 1e6
        hint = max(2.0 * density, 2.0 / mvox)  # about two expected
        click.echo(f"warning: {out} holds no mitochondrion (density {density:g} per million "
                   f"voxels, {mvox:.2g} Mvoxels); for some, raise --density (e.g. --density "
                   f"{hint:.2g}), enlarge --shape or try another --seed", err=True)


def phantom_count(location: str) -> int:
    """How many mitochondria the phantom just written at ``location`` holds."""
    from volref.io import open_group

    return int(open_group(location, mode="r")["volref"].attrs["volref"]["n_mitochondria"])


@cli.command()
@click.argument("path", type=str)
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel to use for images with a channel axis.")
@click.option("--timepoint", type=click.IntRange(min=0), default=None,
              help="Time point to use for images with a time axis.")
def info(path, channel, timepoint):
    """Describe an OME-Zarr image: axes, levels, labels and volref outputs.

    Exits with status 2 when volref could not process the image as given.
    """
    text, problem = describe(path, channel=channel, timepoint=timepoint)
    click.echo(text)
    if problem is not None:
        raise problem


@cli.command()
@click.argument("path", type=str)
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--z", "z", type=click.IntRange(min=0), default=None,
              help="Slice to draw (default: the middle one).")
@click.option("--label", "labels", multiple=True, help="Label image to draw (repeatable; default all).")
@click.option("--crop", nargs=4, type=click.IntRange(min=0), default=None,
              help="Y0 Y1 X0 X1 window to draw.")
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel to draw for images with a channel axis.")
@click.option("--timepoint", type=click.IntRange(min=0), default=None,
              help="Time point to draw for images with a time axis.")
def snapshot(path, out, z, labels, crop, channel, timepoint):
    """Draw one z-slice of PATH and its label images side by side into OUT (PNG)."""
    from volref.report import snapshot as draw

    draw(path, out, z=z, labels=labels or None, crop=crop, channel=channel, timepoint=timepoint)
    click.echo(f"wrote {out}")


def _compute(work, description: str, progress: bool) -> None:
    """Run lazy work on the local threaded scheduler with a progress bar."""
    with dask.config.set(scheduler="threads"), DaskProgress(description, enabled=progress):
        dask.compute(work)


def engine_options(stage_options):
    """Options every engine command shares: where results go and where the blocks run."""

    def wrap(f):
        options = [
            click.argument("image", type=str),
            click.option("--output", type=str, default=None,
                         help="Separate store for the results (default: add them to IMAGE's "
                              "archive, groups only)."),
            click.option("--workers", type=click.IntRange(min=0), default=None,
                         help="Local worker processes (default: one per core, one per GPU "
                              "with GPUs; 0: run blocks one by one in this process)."),
            click.option("--block-shape", nargs=3, type=click.IntRange(min=1), default=None,
                         help="Block Z Y X: multiples of the output chunks and the tile grid "
                              "(default: one chunk deep, ~512 px wide)."),
            click.option("--scheduler", type=str, default=None,
                         help="Address of a running Dask scheduler to use (tcp://, or tls:// "
                              "with the --tls-* files)."),
            click.option("--tls-ca-file", type=click.Path(dir_okay=False), default=None,
                         help="For a tls:// --scheduler: the CA certificate (PEM; see "
                              "cluster/make-certs.sh)."),
            click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                         help="For a tls:// --scheduler: a certificate the CA signed."),
            click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                         help="For a tls:// --scheduler: the certificate's private key."),
            click.option("--cluster", "cluster_file", type=click.Path(dir_okay=False),
                         default=None, help="Cluster file (see cluster/*.yaml) to start."),
            click.option("--overwrite", is_flag=True,
                         help="Recompute results made with other settings."),
            click.option("--break-lock", "break_lock", is_flag=True,
                         help="Remove the store's run lock first: one held from another host "
                              "or not written by volref (a live run on this host is still "
                              "refused)."),
            click.option("--channel", type=click.IntRange(min=0), default=None,
                         help="Channel to process for images with a channel axis (0-based; "
                              "needed when there is more than one)."),
            click.option("--timepoint", type=click.IntRange(min=0), default=None,
                         help="Time point to process for images with a time axis (0-based; "
                              "needed when there is more than one)."),
            *stage_options,
            click.pass_context,
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


SEGMENTER_OPTION = click.option("--segmenter", type=click.Path(dir_okay=False), default=None,
                                help="Ensemble checkpoint (default: the shipped weights).")
REFINER_OPTIONS = (
    click.option("--method", type=click.Choice(list(METHODS)), default=None,
                 help="Refinement method (default: " + DEFAULT_METHOD + " where the fusion was "
                      "fitted for the --segmenter ensemble and the --refiner MAE in use, else "
                      "the paper's mae, with a warning): " + help_text() + "."),
    click.option("--refiner", type=click.Path(dir_okay=False), default=None,
                 help="Checkpoint of the --method model (default: the shipped weights)."),
    click.option("--fusion", type=click.Path(dir_okay=False), default=None,
                 help="--method fused: the fusion file (volref train fusion; default: the "
                      "shipped one, fitted for the shipped ensemble and MAE)."),
    click.option("--tau", type=click.FloatRange(0, 1), default=default_of(RefineSettings, "tau"),
                 show_default=True,
                 help="Patches whose mean uncertainty exceeds this are rebuilt."),
    click.option("--stride", type=click.IntRange(min=4),
                 default=default_of(RefineSettings, "stride"), show_default=True,
                 help="Tile stride (tiles are 128 px; overlaps are blended)."),
    click.option("--max-removed", type=float, default=default_of(RefineSettings, "max_removed"),
                 show_default=True,
                 help="Leave a tile as it was when more than this share (0 < share <= 1) of its "
                      "patches near a mitochondrion is removed: too little is left to rebuild "
                      "from."),
    click.option("--blend", type=click.Choice(list(BLENDS)),
                 default=default_of(RefineSettings, "blend"), show_default=True,
                 help="How overlapping tiles combine: the one tile whose central stride x "
                      "stride block holds the pixel (fewer tiles to run), or a smooth window "
                      "over all of them."),
    click.option("--smooth", type=click.FloatRange(min=0), default=None,
                 help="Sigma (px) of a Gaussian over the class probabilities before the argmax: "
                      "straightens the ragged boundaries of large rebuilt areas; 0: none "
                      f"(default: {default_of(RefineSettings, 'smooth'):g} with --blend centre, "
                      "0 with window)."),
)
PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(list(PRECISIONS)),
    default=default_of(SegmentSettings, "precision"), show_default=True,
    help="Numbers the models compute in. auto: bf16 on GPUs and on CPUs with AVX-512 BF16 or "
         "AMX (2-4x faster there), fp32 on other CPUs (which emulate bf16: fp32 is 2-3x faster); "
         "the run records which. Pin bf16 or fp32 for the same bytes on every kind of machine.")
INTENSITY_OPTIONS = (
    click.option("--intensity-range", nargs=2, type=float, default=None,
                 metavar="LO HI",
                 help="Map intensities LO and HI to the ensemble's 0 and 1 (where the 1st and "
                      "99.8th percentiles of its training volumes sat) instead of measuring the "
                      "image's background and stain levels."),
    click.option("--intensity-window", is_flag=True,
                 default=default_of(SegmentSettings, "intensity_window"),
                 help="Use the image's omero display window (start, end) as --intensity-range."),
)
CSV_OPTION = click.option("--csv", is_flag=True, help=f"Also write {METRICS_CSV_PATH}.")
MIN_VOXELS_OPTION = click.option("--min-voxels", type=click.IntRange(min=0),
                                 default=default_of(RunSettings, "min_voxels"),
                                 show_default=True,
                                 help="Smaller connected pieces are specks, not mitochondria.")

#: command-line flags of settings fields whose flag is not ``--`` + the field with dashes
FLAGS: dict[str, str] = {}


def flag_of(field: str) -> str:
    """The option that sets settings field ``field``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def refine_settings(tau: float, stride: int, precision: str, blend: str, max_removed: float,
                    smooth: float | None) -> RefineSettings:
    """The refine settings of the command line's options (``smooth`` None: the settings'
    default with the centre blend, none with the window blend)."""
    if smooth is None and blend != "centre":
        smooth = 0.0
    if smooth is None:
        smooth = default_of(RefineSettings, "smooth")
    return RefineSettings(tau=tau, stride=stride, precision=precision, blend=blend,
                          max_removed=max_removed, smooth=smooth)


def _execute(ctx: click.Context, stages: tuple[str, ...], *, image: str, output: str | None,
             workers: int | None, block_shape: tuple[int, int, int] | None,
             scheduler: str | None, tls_ca_file: str | None, tls_cert: str | None,
             tls_key: str | None, cluster_file: str | None, overwrite: bool,
             channel: int | None, timepoint: int | None, block: tuple[int, int, int] | None = None,
             break_lock: bool = False, **stage_options: Any) -> None:
    from volref.api import run
    from volref.engine.cluster import ClusterSpec
    from volref.pipeline.run import gpu_count, run_block

    try:
        settings = run_settings(stages, block_shape, overwrite, stage_options)
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint=flag_of(exc.field)) from None
    if break_lock:
        from volref.engine.lock import break_store_lock

        break_store_lock(output if output is not None else image)
    if block is not None:
        stats = run_block(image, block, stages=[s for s in stages if s in ("segment", "refine")],
                          output=output, settings=settings, channel=channel,
                          timepoint=timepoint)
        click.echo(json.dumps(stats, indent=2))
        return
    spec = ClusterSpec(workers=workers, scheduler=scheduler, cluster_file=cluster_file,
                       gpus=gpu_count(), tls=_tls_files(tls_ca_file, tls_cert, tls_key))
    start = time.perf_counter()

    with EngineProgress(enabled=ctx.obj["progress"]) as progress:

        def connected(c: Any) -> None:
            progress.header(f"cluster: {c.description}" +
                            (f", dashboard {c.dashboard}" if c.dashboard else ""))

        result = run(image, stages=stages, output=output, settings=settings, cluster=spec,
                     channel=channel, timepoint=timepoint, observer=progress,
                     on_connect=connected)
    click.echo(f"{result.target}: {len(result.grid)} blocks of {' x '.join(map(str, result.grid.block))}"
               f" in {time.perf_counter() - start:.1f} s")
    for rep in result.reports:
        click.echo(f"  {rep.stage:<10} {rep.computed:>5} computed, {rep.skipped:>5} already "
                   f"done, {rep.seconds:8.1f} s")
    if result.precision is not None:
        why = {"bf16": "native on its workers", "fp32": "its workers have no native bf16"}
        auto = "auto" in (settings.segment.precision, settings.refine.precision)
        click.echo(f"  models computed in {result.precision}"
                   + (f" (auto: {why[result.precision]})" if auto else ""))
    if result.peak_memory:
        peak = max(result.peak_memory.values()) / 2**30
        n = len(result.peak_memory)
        click.echo(f"  peak memory per worker: {peak:.2f} GiB ({counted(n, 'worker', 'workers')})")
    refined = result.report("refine")
    if refined is not None and "changes" in refined.results:
        for line in change_lines(refined.results["changes"]):
            click.echo(f"  {line}")
    measured = result.report("measure")
    if measured is not None:
        click.echo(metrics_summary(measured.results["table"]))


def run_settings(stages: tuple[str, ...], block_shape: tuple[int, int, int] | None,
                 overwrite: bool, options: Mapping[str, Any]) -> RunSettings:
    """The typed :class:`~volref.pipeline.settings.RunSettings` of a command's stage options; an
    option a command does not have keeps the settings' default. The values are as click's
    option types made them (``--tau`` a float, ``--precision`` one of PRECISIONS, ...)."""
    o = dict(options)
    d = RunSettings()
    precision = o.get("precision", d.segment.precision)
    refine = d.refine
    if "tau" in o:
        refine = refine_settings(o["tau"], o["stride"], precision, o["blend"],
                                 o["max_removed"], o["smooth"])
    elif precision != refine.precision:
        refine = refine_settings(refine.tau, refine.stride, precision, refine.blend,
                                 refine.max_removed, None)
    labels = label_settings(o)
    return RunSettings(segmenter=o.get("segmenter"), refiner=o.get("refiner"),
                       segment=SegmentSettings(
                           precision=precision,
                           intensity_range=o.get("intensity_range") or None,
                           intensity_window=o.get("intensity_window", False)),
                       refine=refine,
                       method=o.get("method", d.method), fusion=o.get("fusion"),
                       block_shape=block_shape or None,
                       overwrite=overwrite, csv=o.get("csv", d.csv),
                       min_voxels=o.get("min_voxels", d.min_voxels), labels=labels)


def _tls_files(ca_file, cert, key):
    from volref.engine.cluster import TLSFiles

    given = [f for f in (ca_file, cert, key) if f]
    if not given:
        return None
    if len(given) < 3:
        raise click.UsageError("give --tls-ca-file, --tls-cert and --tls-key together")
    return TLSFiles(ca_file, cert, key)


def metrics_summary(table) -> str:
    """Mean of each consistency metric before and after refinement."""
    from volref.metrics.consistency import METRICS

    lines = [f"{mitochondria(len(table))}; mean per mitochondrion   initial   refined"]
    for m in METRICS:
        a, b = table.get(f"initial_{m}"), table.get(f"refined_{m}")
        if a is None:
            continue
        lines.append(f"  {m:<36} {a.mean():8.2f}  {b.mean():8.2f}")
    return "\n".join(lines)


def _block_index(ctx, param, value):
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter("expected Z,Y,X block indices, e.g. 0,1,2")
    return parts


@cli.command("run")
@engine_options([SEGMENTER_OPTION, *INTENSITY_OPTIONS, *REFINER_OPTIONS, PRECISION_OPTION,
                 CSV_OPTION, MIN_VOXELS_OPTION,
                 click.option("--block", type=str, default=None, callback=_block_index,
                              help="Run only block Z,Y,X (segment + refine) in this process, "
                                   "for debugging.")])
def run_command(ctx, **options):
    """Segment, refine, label and measure every mitochondrion of IMAGE."""
    _execute(ctx, ("segment", "refine", "instances", "measure"), **options)


@cli.command()
@engine_options([SEGMENTER_OPTION, *INTENSITY_OPTIONS, PRECISION_OPTION])
def segment(ctx, **options):
    """Ensemble segmentation: labels/volref-initial and volref/uncertainty."""
    _execute(ctx, ("segment",), **options)


@cli.command()
@engine_options([*REFINER_OPTIONS, PRECISION_OPTION, SEGMENTER_OPTION,
                 *label_options("Refine", "Looked up in the --output store, then in IMAGE's "
                                          "archive.")])
def refine(ctx, **options):
    """Refinement (--method: fused by default, the paper's MAE, or a baseline):
    labels/volref-refined from labels/volref-initial, or from any tool's label image (--labels, --class-map,
    --uncertainty). Prints what it changed (the share of voxels, and of the initial
    mitochondrion voxels turned to background) and warns when it removes much.

    \b
    Another tool's four-class segmentation, its values mapped to volref's classes:
      volref refine IMAGE --labels theirs --class-map background=0,ims=3,cristae=2,matrix=1
    With its own uncertainty (an entropy image, or per-class probabilities):
      ... --uncertainty scores/probabilities
    """
    _execute(ctx, ("refine",), **options)


@cli.command()
@engine_options([CSV_OPTION, MIN_VOXELS_OPTION])
def measure(ctx, **options):
    """Mitochondria (labels/volref-mitochondria) and their metrics (volref/metrics.parquet)."""
    _execute(ctx, ("instances", "measure"), **options)


@cli.command()
@click.argument("image", type=str)
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--output", type=str, default=None,
              help="Store holding the volref results (default: IMAGE's archive).")
@click.option("--tiles", type=click.IntRange(min=1), default=4, show_default=True,
              help="Rows to draw: the tiles with the most refinement, one per z-slice.")
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel the results were made from, for images with a channel axis.")
@click.option("--timepoint", type=click.IntRange(min=0), default=None,
              help="Time point the results were made from, for images with a time axis.")
def panel(image, out, output, tiles, channel, timepoint):
    """Draw tiles as in the paper's Fig. 6: image, initial, removed patches, refined, truth."""
    from volref.report import refinement_panel

    refinement_panel(image, out, results=output, n_tiles=tiles, channel=channel,
                     timepoint=timepoint)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("image", type=str)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for index.html and its PNGs.")
@click.option("--output", type=str, default=None,
              help="Store holding the volref results (default: IMAGE's archive).")
@click.option("--tiles", type=click.IntRange(min=1), default=4, show_default=True,
              help="Before/after tiles to show.")
@click.option("--gallery", type=click.IntRange(min=1), default=8, show_default=True,
              help="Single mitochondria to show, most changed by refinement first.")
@click.option("--channel", type=click.IntRange(min=0), default=None,
              help="Channel the results were made from, for images with a channel axis.")
@click.option("--timepoint", type=click.IntRange(min=0), default=None,
              help="Time point the results were made from, for images with a time axis.")
def report(image, out, output, tiles, gallery, channel, timepoint):
    """A self-contained HTML report of a refined volume: slices, uncertainty, before/after
    tiles, single mitochondria, per-mitochondrion metric histograms, provenance."""
    from volref.report.html import write_report

    index = write_report(image, out, results=output, tiles=tiles, channel=channel,
                         timepoint=timepoint, gallery=gallery)
    click.echo(f"wrote {index}")


def _weights_dest(method: str) -> str:
    """The parameter of ``volref evaluate``'s checkpoint option for ``method``: that of the
    trainable method whose model file it runs (``fused`` runs the MAE's: ``--mae``)."""
    spec = REGISTRY[method]
    owner = next((m.name for m in REGISTRY.values() if m.trainable and m.weights == spec.weights
                  and m.model == spec.model), method)
    return owner.replace("-", "_") + "_weights"


def _also(method: str) -> str:
    """``", also fused's"``: the other methods that run ``method``'s model file."""
    others = [m for m in REGISTRY if m != method and _weights_dest(m) == _weights_dest(method)]
    return "".join(f", also {m}'s" for m in others)


def weight_options(f: Any) -> Any:
    """``--NAME PATH`` for every trainable refinement method: its checkpoint (also for the
    methods that run the same model file)."""
    for spec in reversed(list(REGISTRY.values())):
        if spec.trainable:
            f = click.option(f"--{spec.name}", _weights_dest(spec.name),
                             type=click.Path(exists=True, dir_okay=False), default=None,
                             help=f"{spec.label} checkpoint{_also(spec.name)} (default: the "
                                  "shipped weights).")(f)
    return f


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder for table2.json, table2.md, table2.png and fig6.png (required).")
@click.option("--output", "out_deprecated", type=click.Path(file_okay=False), default=None,
              hidden=True, help="Deprecated name of --out (--output names a results store in "
                                "the other commands).")
@click.option("--methods", default=",".join(table_order()), show_default=True,
              help="Comma-separated refinement methods to compare with the initial labels.")
@click.option("--every", type=click.IntRange(min=1), default=4, show_default=True,
              help="Use every N-th z-slice.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=150, show_default=True,
              help="At most this many implausible and control tiles (a seeded draw).")
@click.option("--segmenter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ensemble whose probabilities the methods that need them refine (default: "
                   "shipped).")
@weight_options
@click.pass_context
def evaluate(ctx, stores, out, out_deprecated, methods, every, max_tiles, segmenter, **weights):
    """The paper's Table 2 on held-out phantoms (STORES, segmented by volref segment).

    Selects implausible tiles (in degraded areas, initial labels outside the control group's
    5-95 % range on some metric) and plausible control tiles (clear, confirmed by ground truth),
    refines the implausible ones by every method and reports the five consistency metrics
    (mean, standard error) and Dice inside degraded regions against ground truth.
    """
    from pathlib import Path

    from volref.cli.train import command_line
    from volref.evaluate.methods import MethodSettings
    from volref.evaluate.table2 import Table2Settings, evaluate_table2, to_markdown, write
    from volref.models.checkpoint import CheckpointError
    from volref.models.registry import (
        DEFAULT_REFINERS,
        DEFAULT_SEGMENTER,
        load_refiner,
        load_segmenter,
    )
    from volref.pipeline.refine import fusion_for
    from volref.pipeline.stage import check_model
    from volref.report.evaluation import table2_bars, table2_panel

    if out is None and out_deprecated is not None:
        log.warning("volref evaluate --output is deprecated: use --out (the folder to write)")
        out = out_deprecated
    if out is None:
        raise click.UsageError("Missing option '--out' (the folder to write).")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in REGISTRY]
    if bad:
        raise click.BadParameter(f"unknown method {', '.join(bad)} (choose from "
                                 f"{', '.join(table_order())})", param_hint="--methods")
    models = {}
    for m in chosen:
        if REGISTRY[m].weights is None:  # runs the ensemble
            continue
        try:
            models[m] = load_refiner(weights[_weights_dest(m)], method=m)
        except FileNotFoundError:
            raise VolrefError(f"no model for {m}: train one (volref train refiner --method {m}) "
                              "or leave it out of --methods") from None
        except CheckpointError as exc:
            raise VolrefError(str(exc)) from None
    ensemble = load_segmenter(segmenter) if any(REGISTRY[m].probabilities for m in chosen) \
        else None
    method_settings = MethodSettings()
    fused = [m for m in chosen if REGISTRY[m].block == "fused"]
    if fused:
        method_settings = MethodSettings(fusion=fusion_for(None, check_model(
            segmenter, DEFAULT_SEGMENTER, load_segmenter), check_model(
            weights[_weights_dest(fused[0])], DEFAULT_REFINERS[fused[0]], load_refiner)))
    settings = Table2Settings(every=every, max_tiles=max_tiles)
    bar = None

    def progress(method: str, done: int, total: int) -> None:
        nonlocal bar
        if not ctx.obj["progress"]:
            return
        if done == 1:
            bar = click.progressbar(length=total, label=f"{method:<7}", file=sys.stderr)
            bar.__enter__()
        bar.update(1)
        if done == total:
            bar.__exit__(None, None, None)

    result, examples = evaluate_table2(stores, models, ensemble, methods=chosen,
                                       settings=settings, method_settings=method_settings,
                                       progress=progress)
    if not result["tiles"]["implausible"]:
        raise VolrefError(
            f"no implausible tile in {result['tiles']['slices']} slices of "
            f"{', '.join(str(s) for s in stores)}: Table 2 compares methods on tiles whose "
            "initial labels break a rule inside a degraded area (phantoms with low-SNR spots: "
            "volref synth --degraded-fraction); nothing written")
    result["command"] = command_line()
    write(result, out)
    table2_bars(result, Path(out) / "table2.png")
    if examples:
        table2_panel(examples, Path(out) / "fig6.png")
    click.echo(to_markdown(result))
    for warning in result["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    tiles = result["tiles"]
    click.echo(f"{tiles['implausible']} implausible and {tiles['control']} control tiles from "
               f"{tiles['slices']} slices; wrote {out}/table2.json, table2.md, table2.png"
               + (", fig6.png" if examples else ""))


def _register() -> None:
    from volref.cli.train import train

    cli.add_command(train)
    for group in (cli, train):
        for command in group.commands.values():
            if command.short_help is None and command.help:
                # the whole first paragraph: click's default cuts it at 45 characters or at
                # the first period ("... the paper's Fig.")
                command.short_help = " ".join(command.help.split("\n\n")[0].split())


_register()


def one_line(text: str) -> str:
    """A message on one line with every URL's credentials dropped (what stderr may show)."""
    from volref.io.store import scrub

    return scrub(" ".join(str(text).split()))


class _Scrub(logging.Filter):
    """Log records pass through :func:`~volref.io.store.scrub`: no library's log line shows a
    password or a signed query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        from volref.io.store import scrub

        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def _usage_line(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    return one_line(exc.format_message()) + where


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (callable from tests).

    User mistakes, usage errors included, print one line (``volref: error: ...``) and return 2.
    """
    try:
        cli.main(args=argv, prog_name="volref", standalone_mode=False)
    except VolrefError as exc:
        click.echo(f"volref: error: {one_line(str(exc))}", err=True)
        return 2
    except click.exceptions.Abort as exc:
        from volref.engine.lock import Terminated

        if isinstance(exc.__cause__, Terminated):
            click.echo("volref: terminated (SIGTERM); finished blocks are recorded, run the same "
                       "command again to resume", err=True)
            return 128 + 15
        click.echo("volref: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"volref: error: {_usage_line(exc)}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        if not type(exc).__module__.startswith("zarr."):
            raise  # a bug: entry() shows its traceback
        # zarr refusing a store's metadata (a missing node_type, a broken array document) where
        # volref reads a node it did not check first: the store's fault, not volref's
        from volref.io.store import scrub

        click.echo(f"volref: error: a zarr document of the store is not valid "
                   f"({type(exc).__name__}: {scrub(one_line(str(exc)))})", err=True)
        return 2
    return 0


def entry() -> int:
    """The ``volref`` script: :func:`main`, and a bug's traceback with credentials scrubbed."""
    import traceback

    try:
        return main()
    except Exception as exc:  # noqa: BLE001 - a bug: show it all, minus secrets
        text = "".join(traceback.format_exception(exc))
        from volref.io.store import scrub

        sys.stderr.write(scrub(text))
        return 1


if __name__ == "__main__":
    sys.exit(entry())
