"""What each refinement method costs: the refine stage alone, every method on the same segmented
phantom, side by side in one run.

    python -m benchmarks.refine_methods [--quick] [--methods mae,fused] [--shape 8 512 512]
        [--workers 2] [--repeats 3] [--json OUT]

The phantom (``benchmarks.engine_scaling``'s content: seed 21, density 1.5, a fifth of the
mitochondria with a low-SNR spot) is segmented once; then ``volref refine --method M
--overwrite`` runs for every method, the methods interleaved ``--repeats`` times (a slow spell
of the machine does not fall on one method). Rows: median wall time of the stage, voxels/s, and
the ratio to the first method; ``fused`` re-runs the ensemble on the tiles that hold a rebuilt
pixel, so its row also gives that cost against the segment stage's own time.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import dask

from benchmarks.common import command, machine, parser, write_json
from benchmarks.engine_scaling import cluster_for
from volref.pipeline import write_phantom
from volref.pipeline.run import RunSettings, run
from volref.synth import SynthConfig


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "a 2x128x128 phantom, one repeat (a smoke run)", repeats=3)
    ap.add_argument("--methods", default="mae,fused")
    ap.add_argument("--shape", nargs=3, type=int, default=(8, 512, 512))
    ap.add_argument("--block-shape", nargs=3, type=int, default=(8, 256, 512))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    shape = (2, 128, 128) if args.quick else tuple(args.shape)
    block = (2, 128, 128) if args.quick else tuple(args.block_shape)
    if args.quick:
        args.repeats, args.workers = 1, 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="volref-methods-"))
    image = work / "phantom.ome.zarr"
    config = SynthConfig(shape=shape, seed=21, density=1.5, degraded_fraction=0.2,
                         chunks=(block[0], min(256, block[1]), min(256, block[2])))
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(config, image, overwrite=True))
    start = time.perf_counter()
    seg = run(image, stages=("segment",), settings=RunSettings(block_shape=block),
              cluster=cluster_for(args.workers))
    segment_s = time.perf_counter() - start
    print(f"segment: {segment_s:.1f} s ({seg.reports[0].seconds:.1f} s in blocks)")
    walls: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m in methods:
            start = time.perf_counter()
            run(image, stages=("refine",), cluster=cluster_for(args.workers),
                settings=RunSettings(block_shape=block, method=m, overwrite=True))
            walls[m].append(time.perf_counter() - start)
            print(f"{m:<8} {walls[m][-1]:7.1f} s", flush=True)
    voxels = math.prod(shape)
    first = statistics.median(walls[methods[0]])
    rows = [{"method": m, "wall_s": statistics.median(w), "wall_s_runs": w,
             "voxels_per_s": voxels / statistics.median(w),
             "vs_first": statistics.median(w) / first} for m, w in walls.items()]
    for r in rows:
        print(f"{r['method']:<8} median {r['wall_s']:7.1f} s  {r['voxels_per_s'] / 1e3:7.1f} "
              f"kvoxel/s  {r['vs_first']:.2f}x {methods[0]}")
    payload = {"machine": machine(), "shape": list(shape), "block": list(block),
               "workers": args.workers, "repeats": args.repeats, "segment_s": segment_s,
               "rows": rows, "command": command("refine_methods", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
