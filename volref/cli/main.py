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

import click
import dask

from volref import __version__
from volref.classes import mitochondria
from volref.cli.info import describe
from volref.cli.progress import DaskProgress, EngineProgress
from volref.errors import VolrefError

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
@click.option("--shape", nargs=3, type=click.IntRange(min=1), default=(64, 512, 512),
              show_default=True, help="Volume shape Z Y X in voxels.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--chunks", nargs=3, type=click.IntRange(min=1), default=(32, 256, 256),
              show_default=True, help="Chunk shape Z Y X of every stored array.")
@click.option("--density", type=click.FloatRange(min=0), default=0.24, show_default=True,
              help="Mitochondria per million voxels.")
@click.option("--degraded-fraction", type=click.FloatRange(0, 1), default=0.1,
              show_default=True, help="Fraction of mitochondria with a low-SNR area.")
@click.option("--degraded-length", nargs=2, type=click.FloatRange(min=0), default=(20.0, 60.0),
              show_default=True, help="Range of a low-SNR area's length along the skeleton (px); "
                                      "the area also spans the mitochondrion's width.")
@click.option("--noise", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="Noise level (2 = a quarter of the photons).")
@click.option("--voxel-size", nargs=3, type=click.FloatRange(min=0, min_open=True),
              default=(0.375, 0.15, 0.15), show_default=True, help="Voxel size Z Y X in µm.")
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
@click.option("--channel", type=click.IntRange(min=0), default=None)
@click.option("--timepoint", type=click.IntRange(min=0), default=None)
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
                         help="Address of a running Dask scheduler to use."),
            click.option("--cluster", "cluster_file", type=click.Path(dir_okay=False),
                         default=None, help="Cluster file (see cluster/*.yaml) to start."),
            click.option("--overwrite", is_flag=True,
                         help="Recompute results made with other settings."),
            click.option("--channel", type=click.IntRange(min=0), default=None),
            click.option("--timepoint", type=click.IntRange(min=0), default=None),
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
    click.option("--method", type=click.Choice(["mae", "mae-x", "cnn-ae", "crf"]),
                 default="mae", show_default=True,
                 help="The MAE, or one of the paper's baselines: MAE+X (with an image "
                      "encoder), CNN denoising autoencoder, dense CRF (on the ensemble's "
                      "probabilities and the image; re-runs the --segmenter ensemble)."),
    click.option("--refiner", type=click.Path(dir_okay=False), default=None,
                 help="Checkpoint of the --method model (default: the shipped weights)."),
    click.option("--tau", type=click.FloatRange(0, 1), default=0.4, show_default=True,
                 help="Patches whose mean uncertainty exceeds this are rebuilt."),
    click.option("--stride", type=click.IntRange(min=4), default=64, show_default=True,
                 help="Tile stride (tiles are 128 px; overlaps are blended)."),
    click.option("--max-removed", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="Leave a tile as it was when more than this share of its patches near a "
                      "mitochondrion is removed: too little is left to rebuild from (default: "
                      "the refine settings' default)."),
    click.option("--blend", type=click.Choice(["centre", "window"]), default="centre",
                 show_default=True,
                 help="How overlapping tiles combine: the one tile whose central stride x "
                      "stride block holds the pixel (fewer tiles to run), or a smooth window "
                      "over all of them."),
    click.option("--smooth", type=click.FloatRange(min=0), default=None,
                 help="Sigma (px) of a Gaussian over the class probabilities before the argmax: "
                      "straightens the ragged boundaries of large rebuilt areas; 0: none "
                      "(default: 1 with --blend centre, 0 with window)."),
)
PRECISION_OPTION = click.option(
    "--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
    help="Numbers the models compute in (bf16: 2-3x faster on GPUs and on CPUs with "
         "AVX-512 BF16; fp32 for reference).")
INTENSITY_OPTIONS = (
    click.option("--intensity-range", nargs=2, type=float, default=None,
                 metavar="LO HI",
                 help="Map intensities LO and HI to the ensemble's 0 and 1 (where the 1st and "
                      "99.8th percentiles of its training volumes sat) instead of measuring the "
                      "image's background level and noise."),
    click.option("--intensity-window", is_flag=True,
                 help="Use the image's omero display window (start, end) as --intensity-range."),
)
CSV_OPTION = click.option("--csv", is_flag=True, help="Also write volref/metrics.csv.")
MIN_VOXELS_OPTION = click.option("--min-voxels", type=click.IntRange(min=0), default=1000,
                                 show_default=True,
                                 help="Smaller connected pieces are specks, not mitochondria.")


def _execute(ctx, stages, image, output, workers, block_shape, scheduler, cluster_file,
             overwrite, channel, timepoint, segmenter=None, refiner=None, tau=0.4, stride=64,
             blend="centre", precision="bf16", csv=False, block=None, min_voxels=1000,
             method="mae", max_removed=None, smooth=None, intensity_range=None,
             intensity_window=False):
    from volref.engine.cluster import ClusterSpec
    from volref.pipeline.run import RunSettings, gpu_count, run, run_block
    from volref.stages.refine import RefineSettings
    from volref.stages.segment import SegmentSettings

    extra = {} if max_removed is None else {"max_removed": max_removed}
    if smooth is not None or blend != "centre":
        extra["smooth"] = 0.0 if smooth is None else smooth
    try:
        refine_settings = RefineSettings(tau=tau, stride=stride, precision=precision, blend=blend,
                                         **extra)
    except ValueError as exc:
        hint = "--smooth" if str(exc).startswith("smooth") else "--stride"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    try:
        segment_settings = SegmentSettings(precision=precision,
                                           intensity_range=intensity_range or None,
                                           intensity_window=intensity_window)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--intensity-range") from None
    settings = RunSettings(segmenter=segmenter, refiner=refiner, refine=refine_settings,
                           method=method,
                           segment=segment_settings,
                           block_shape=tuple(block_shape) if block_shape else None,
                           overwrite=overwrite, csv=csv, min_voxels=min_voxels)
    if block is not None:
        result = run_block(image, block, stages=[s for s in stages if s in ("segment", "refine")],
                           output=output, settings=settings, channel=channel,
                           timepoint=timepoint)
        click.echo(json.dumps(result, indent=2))
        return
    spec = ClusterSpec(workers=workers, scheduler=scheduler, cluster_file=cluster_file,
                       gpus=gpu_count())
    start = time.perf_counter()
    with EngineProgress(enabled=ctx.obj["progress"]) as progress:
        result = run(image, stages=stages, output=output, settings=settings, cluster=spec,
                     channel=channel, timepoint=timepoint, observer=progress,
                     on_connect=lambda c: click.echo(
                         f"cluster: {c.description}" +
                         (f", dashboard {c.dashboard}" if c.dashboard else ""), err=True))
    click.echo(f"{result.target}: {len(result.grid)} blocks of {' x '.join(map(str, result.grid.block))}"
               f" in {time.perf_counter() - start:.1f} s")
    for rep in result.reports:
        click.echo(f"  {rep.stage:<10} {rep.computed:>5} computed, {rep.skipped:>5} already "
                   f"done, {rep.seconds:8.1f} s")
    if result.peak_memory:
        peak = max(result.peak_memory.values()) / 2**30
        click.echo(f"  peak memory per worker: {peak:.2f} GiB ({len(result.peak_memory)} workers)")
    measured = result.report("measure")
    if measured is not None:
        click.echo(metrics_summary(measured.results["table"]))


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
@engine_options([*REFINER_OPTIONS, PRECISION_OPTION, SEGMENTER_OPTION])
def refine(ctx, **options):
    """MAE refinement: labels/volref-refined from labels/volref-initial (--method: or a
    baseline)."""
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
@click.option("--tiles", type=click.IntRange(min=1), default=4, show_default=True)
def panel(image, out, output, tiles):
    """Draw tiles as in the paper's Fig. 6: image, initial, removed patches, refined, truth."""
    from volref.report import refinement_panel

    refinement_panel(image, out, results=output, n_tiles=tiles)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("image", type=str)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for index.html and its PNGs.")
@click.option("--output", type=str, default=None,
              help="Store holding the volref results (default: IMAGE's archive).")
@click.option("--tiles", type=click.IntRange(min=1), default=4, show_default=True,
              help="Before/after tiles to show.")
def report(image, out, output, tiles):
    """A self-contained HTML report of a refined volume: slices, uncertainty, before/after
    tiles, per-mitochondrion metric histograms, provenance."""
    from volref.report.html import write_report

    index = write_report(image, out, results=output, tiles=tiles)
    click.echo(f"wrote {index}")


@cli.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--output", "out", type=click.Path(file_okay=False), required=True,
              help="Folder for table2.json, table2.md, table2.png and fig6.png.")
@click.option("--methods", default="crf,cnn-ae,mae-x,mae", show_default=True,
              help="Comma-separated refinement methods to compare with the initial labels.")
@click.option("--every", type=click.IntRange(min=1), default=4, show_default=True,
              help="Use every N-th z-slice.")
@click.option("--max-tiles", type=click.IntRange(min=1), default=150, show_default=True,
              help="At most this many implausible and control tiles (a seeded draw).")
@click.option("--segmenter", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ensemble whose probabilities the CRF refines (default: shipped).")
@click.option("--mae", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--mae-x", "mae_x", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--cnn-ae", "cnn_ae", type=click.Path(exists=True, dir_okay=False), default=None)
@click.pass_context
def evaluate(ctx, stores, out, methods, every, max_tiles, segmenter, mae, mae_x, cnn_ae):
    """The paper's Table 2 on held-out phantoms (STORES, segmented by volref segment).

    Selects implausible tiles (in degraded areas, initial labels outside the control group's
    5-95 % range on some metric) and plausible control tiles (clear, confirmed by ground truth),
    refines the implausible ones by every method and reports the five consistency metrics
    (mean, standard error) and Dice inside degraded regions against ground truth.
    """
    from pathlib import Path

    from volref.cli.train import command_line
    from volref.evaluate.table2 import REFINERS, Table2Settings, evaluate_table2, to_markdown, write
    from volref.models.checkpoint import CheckpointError
    from volref.models.registry import load_refiner, load_segmenter
    from volref.report.evaluation import table2_bars, table2_panel

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in REFINERS]
    if bad:
        raise click.BadParameter(f"unknown method {', '.join(bad)} (choose from "
                                 f"{', '.join(REFINERS)})", param_hint="--methods")
    paths = {"mae": mae, "mae-x": mae_x, "cnn-ae": cnn_ae}
    models = {}
    for m in chosen:
        if m == "crf":
            continue
        try:
            models[m] = load_refiner(paths[m], method=m)
        except FileNotFoundError:
            raise VolrefError(f"no model for {m}: train one (volref train refiner --method {m}) "
                              "or leave it out of --methods") from None
        except CheckpointError as exc:
            raise VolrefError(str(exc)) from None
    ensemble = load_segmenter(segmenter) if "crf" in chosen else None
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
                                       settings=settings, progress=progress)
    result["command"] = command_line()
    write(result, out)
    table2_bars(result, Path(out) / "table2.png")
    if examples:
        table2_panel(examples, Path(out) / "fig6.png")
    click.echo(to_markdown(result))
    tiles = result["tiles"]
    click.echo(f"{tiles['implausible']} implausible and {tiles['control']} control tiles from "
               f"{tiles['slices']} slices; wrote {out}/table2.json, table2.md, table2.png"
               + (", fig6.png" if examples else ""))


def _register() -> None:
    from volref.cli.train import train

    cli.add_command(train)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (callable from tests)."""
    try:
        cli.main(args=argv, prog_name="volref", standalone_mode=False)
    except VolrefError as exc:
        click.echo(f"volref: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("volref: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
