"""End-to-end ``volref run`` on phantoms of growing size, and on 1..N workers: time per stage,
voxels/s and peak memory per worker.

    python -m benchmarks.engine_scaling [--quick] [--sizes 1,2,4,8] [--base 8 512 512]
        [--block-shape 8 256 512] [--workers 2] [--worker-sweep 1,2] [--repeats 1] [--json OUT]

Each size is ``k`` copies of one base phantom stacked along z (so every size holds the same
content per voxel: a fresh phantom per size would hold a different number of mitochondria and
degraded areas, and refinement time follows those), run on a fresh local cluster of
``--workers`` single-threaded worker processes (on a machine with GPUs: one worker per GPU,
as ``volref run`` starts them) with the shipped models and one block shape for
every size (the default shape would give the smallest volume smaller blocks, whose overlapping
tiles cost more per voxel). ``--worker-sweep`` then runs the base volume again on
each number of workers. Peak memory is each worker process's maximum resident set since it
started (getrusage), read before the cluster closes. With ``--repeats N`` every size runs N
times, the sizes interleaved (1x, 2x, ..., 1x, 2x, ...) so that a slow spell of the machine
does not fall on one size; rows hold the median wall time (min and max beside it), and a
least-squares line ``wall = fixed + per_voxel * voxels`` through the medians separates the
fixed start (cluster, model loading) from the work that grows with the volume; the line also
projects the time for the paper's dataset (12 stacks of 2048x2048x150, 7.5 Gvoxel) on this
machine. ``--quick`` runs a 2x128x128 base volume at 1x and 2x on one worker (a smoke run; numbers
are not comparable).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import zarr

from benchmarks.common import command, machine, parser, write_json
from volref.engine.cluster import ClusterSpec
from volref.io.ngff import Axis
from volref.io.write import create_multiscale, default_levels, pyramid_geometry, store_pyramid
from volref.pipeline import write_phantom
from volref.pipeline.run import RunSettings, gpu_count, run
from volref.stages.settings import RefineSettings, SegmentSettings
from volref.synth import SynthConfig


def stacked(base_image: Path, image: Path, k: int, chunks: tuple[int, int, int]) -> tuple:
    """An image of ``k`` copies of the base phantom's image along z."""
    base = zarr.open_group(str(base_image), mode="r")
    data = da.concatenate([da.from_zarr(base["s0"])] * k, axis=0)
    root = zarr.open_group(str(image), mode="w-", zarr_format=3)
    levels = pyramid_geometry(data.shape, (0.375, 0.15, 0.15), default_levels(data.shape),
                              chunks, "uint16", "0.5", method="mean")
    axes = tuple(Axis(n, "space", "micrometer") for n in ("z", "y", "x"))
    arrays = create_multiscale(root, levels, axes, version="0.5", name=f"{k} x phantom",
                               method="mean")
    with dask.config.set(scheduler="threads"):
        dask.compute(store_pyramid(data.rechunk(chunks), arrays, "mean"))
    return data.shape


#: the paper's dataset: 12 z-stacks of 2048 x 2048 x 150 voxels
PAPER_VOXELS = 12 * 150 * 2048 * 2048


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "a small base volume (a smoke run; numbers not comparable)", repeats=1)
    ap.add_argument("--sizes", default="1,4", help="volume multiples, e.g. 1,2,4,8")
    ap.add_argument("--base", nargs=3, type=int, default=(8, 512, 512))
    ap.add_argument("--block-shape", nargs=3, type=int, default=(8, 256, 512))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-sweep", default="", help="worker counts for the base volume, "
                    "e.g. 1,2")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--precisions", default="auto", help="model precisions to run side by side "
                    "(interleaved), e.g. auto,bf16: the default against a pinned one")
    ap.add_argument("--methods", default="default", help="refinement methods to run side by "
                    "side (interleaved), e.g. default,mae: volref's default against the paper's")
    args = ap.parse_args(argv)
    base = (2, 128, 128) if args.quick else tuple(args.base)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="volref-scaling-"))
    block = (2, 128, 128) if args.quick else tuple(args.block_shape)
    if args.quick:
        args.sizes, args.workers, args.worker_sweep = "1,2", 1, ""
    base_image = work / "base.ome.zarr"
    if base_image.exists():
        shutil.rmtree(base_image)
    chunks = (block[0], min(256, block[1]), min(256, block[2]))
    config = SynthConfig(shape=base, seed=21, chunks=chunks, density=1.5, degraded_fraction=0.2)
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(config, base_image))
    sizes = [int(s) for s in args.sizes.split(",")]
    counts = [int(s) for s in args.worker_sweep.split(",") if s and int(s) != args.workers]
    # variants run side by side: (method, precision); the first is the one the rows describe
    variants = [(m.strip(), p.strip()) for m in args.methods.split(",")
                for p in args.precisions.split(",")]
    first_v = variants[0]
    runs: dict[tuple[int, int, tuple[str, str]], list[dict]] = {}
    for _ in range(args.repeats):  # interleaved: a slow spell does not fall on one size
        for k in sizes:
            for v in variants:
                runs.setdefault((k, args.workers, v), []).append(
                    measure(work, base_image, config.chunks, block, args.workers, k, *v))
        for n in counts:
            runs.setdefault((1, n, first_v), []).append(
                measure(work, base_image, config.chunks, block, n, 1, *first_v))
    others = [median_row(runs[k, args.workers, v]) for k in sizes for v in variants[1:]]
    rows = [median_row(runs[k, args.workers, first_v]) for k in sizes]
    for row in others:
        mine = next(r for r in rows if r["multiple"] == row["multiple"])
        row["speedup_of_first"] = row["wall_s"] / mine["wall_s"]
        print(f"{row['multiple']}x: {mine['method']} {mine['precision']} ({mine['resolved']}) "
              f"{row['speedup_of_first']:.2f}x the voxels/s of {row['method']} "
              f"{row['precision']} ({row['resolved']}); median walls {mine['wall_s']:.1f} and "
              f"{row['wall_s']:.1f} s")
    sweep = sorted([median_row(runs[1, n, first_v]) for n in counts]
                   + [r for r in rows if r["multiple"] == 1 and counts], key=lambda r: r["workers"])
    first = rows[0]
    for row in rows[1:]:
        row["time_per_voxel_vs_1x"] = (row["wall_s"] / row["voxels"]) / \
            (first["wall_s"] / first["voxels"])
        row["peak_memory_vs_1x"] = row["peak_rss_gib_max"] / first["peak_rss_gib_max"]
        print(f"{row['multiple']}x vs {first['multiple']}x: time per voxel "
              f"{row['time_per_voxel_vs_1x']:.2f}x, peak memory per worker "
              f"{row['peak_memory_vs_1x']:.2f}x")
    line = fit_line(rows) if len(rows) > 1 else None
    if line:
        print(f"wall = {line['fixed_s']:.1f} s + {line['s_per_mvoxel']:.2f} s/Mvoxel; "
              f"largest deviation of a median from the line {line['max_deviation']:.1%}")
        line["paper_dataset_s"] = line["fixed_s"] + line["s_per_mvoxel"] * PAPER_VOXELS / 1e6
        print(f"projected for the paper's data (12 stacks of 2048x2048x150, "
              f"{PAPER_VOXELS / 1e9:.2f} Gvoxel) on this machine: "
              f"{line['paper_dataset_s'] / 60:.1f} min")
    for row in sweep[1:]:
        row["speedup_vs_first"] = row["voxels_per_s"] / sweep[0]["voxels_per_s"]
        print(f"{row['workers']} workers vs {sweep[0]['workers']}: "
              f"{row['speedup_vs_first']:.2f}x voxels/s")
    payload = {"machine": machine(), "workers": args.workers, "block": block,
               "repeats": args.repeats, "rows": rows, "line": line, "worker_sweep": sweep,
               "other_variants": others,
               "command": command("engine_scaling", argv)}
    write_json(args.json, payload)
    return payload


def median_row(runs: list[dict]) -> dict:
    """The run with the median wall time, with every run's wall time and the largest peak."""
    walls = [r["wall_s"] for r in runs]
    row = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
    row.update(wall_s=statistics.median(walls), wall_s_min=min(walls), wall_s_max=max(walls),
               wall_s_runs=walls, voxels_per_s=row["voxels"] / statistics.median(walls),
               peak_rss_gib_max=max(r["peak_rss_gib_max"] for r in runs))
    return row


def fit_line(rows: list[dict]) -> dict:
    """Least squares ``wall = fixed + per_voxel * voxels`` through the median rows."""
    xs = [r["voxels"] for r in rows]
    ys = [r["wall_s"] for r in rows]
    slope, fixed = statistics.linear_regression(xs, ys)
    deviation = [abs(y - (fixed + slope * x)) / y for x, y in zip(xs, ys)]
    return {"fixed_s": fixed, "s_per_mvoxel": slope * 1e6, "max_deviation": max(deviation),
            "deviation": deviation}


def cluster_for(workers: int) -> ClusterSpec:
    """``workers`` CPU worker processes; on a machine with GPUs, one worker per GPU instead
    (dask-cuda), as ``volref run`` starts them."""
    gpus = gpu_count()
    return ClusterSpec(gpus=gpus) if gpus else ClusterSpec(workers=workers)


def measure(work: Path, base_image: Path, chunks: tuple[int, int, int],
            block: tuple[int, int, int], workers: int, k: int, method: str = "default",
            precision: str = "auto") -> dict:
    image = work / f"phantom-{k}x-{workers}w.ome.zarr"
    if image.exists():
        shutil.rmtree(image)
    shape = stacked(base_image, image, k, chunks)
    start = time.perf_counter()
    result = run(image, settings=RunSettings(block_shape=block,
                                             method=None if method == "default" else method,
                                             segment=SegmentSettings(precision=precision),
                                             refine=RefineSettings(precision=precision)),
                 cluster=cluster_for(workers))
    provenance = json.loads((image / "volref" / "provenance.json").read_text())
    resolved = provenance["segment"]
    wall = time.perf_counter() - start
    voxels = math.prod(shape)
    row = {"multiple": k, "shape": shape, "voxels": voxels, "workers": workers,
           "method": method, "method_run": provenance["refine"]["method"],
           "precision": precision, "resolved": resolved["settings"]["precision"],
           "blocks": len(result.grid), "block": result.grid.block, "wall_s": wall,
           "voxels_per_s": voxels / wall,
           "stages_s": {r.stage: r.seconds for r in result.reports},
           "peak_rss_gib_per_worker": {w: m / 2**30 for w, m in result.peak_memory.items()},
           "peak_rss_gib_max": max(result.peak_memory.values()) / 2**30,
           "peak_rss_gib_after_stage": {s: max(p.values()) / 2**30
                                        for s, p in result.stage_peak_memory.items()}}
    print(f"{k:>3}x {'x'.join(map(str, shape)):>14} {workers} workers {row['method_run']} "
          f"{precision}"
          f"({row['resolved']}) {len(result.grid):>4} "
          f"blocks {wall:8.1f} s {voxels / wall / 1e3:8.1f} kvoxel/s  peak/worker "
          f"{row['peak_rss_gib_max']:.2f} GiB  "
          + " ".join(f"{s}={t:.0f}s" for s, t in row["stages_s"].items()) + "  peak after "
          + " ".join(f"{s}={g:.2f}" for s, g in row["peak_rss_gib_after_stage"].items()),
          flush=True)
    return row


if __name__ == "__main__":
    main()
