"""Where a block task's time goes: reading its inputs, computing, writing its chunks.

    python -m benchmarks.block_io [--store STORE] [--blocks 3] [--block-shape Z Y X]
        [--quick] [--json OUT]

Answers whether prefetching the next block while the current one computes can pay: at most
the share of a task spent reading. Runs the ``refine`` and then the ``segment`` block tasks of a
copy of ``--store`` (an image volref segmented, e.g. after ``make demo``; blocks as ``volref run``
makes them unless ``--block-shape``) one after another in this
process (one core, as a worker runs them), after one warm-up block per stage (model loading),
and times every ``Source.read`` and ``Source.write`` the tasks make: compressed zarr chunks from
and to the local disk, with decoding/encoding. Everything else in the task is "compute".
Results hold for a local disk; object storage has other latencies (measure there).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import command, machine, parser, store_arg, write_json
from volref.engine.runner import run_task
from volref.io import open_image
from volref.pipeline import blocks
from volref.pipeline.refine import plan_refine
from volref.pipeline.run import RunSettings, block_grid, open_target
from volref.pipeline.segment import plan_segment


def timed_io(seconds: dict[str, float]):
    """Wrap ``Source.read`` and ``Source.write`` to add their time to ``seconds``; the undo."""
    originals = {name: getattr(blocks.Source, name) for name in ("read", "write")}

    def wrap(name, fn):
        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start
        return timed

    for name, fn in originals.items():
        setattr(blocks.Source, name, wrap(name, fn))
    return lambda: [setattr(blocks.Source, n, fn) for n, fn in originals.items()]


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, "1 block per stage")
    ap.add_argument("--store", default=None, help="a segmented store (default: demo/phantom.ome.zarr; with --quick: a small phantom made here)")
    ap.add_argument("--blocks", type=int, default=3, help="blocks timed per stage")
    ap.add_argument("--block-shape", nargs=3, type=int, default=None)
    args = ap.parse_args(argv)
    count = 1 if args.quick else args.blocks
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="volref-blockio-"))
    store_arg(args, work, default="demo/phantom.ome.zarr")
    store = work / "copy.ome.zarr"
    shutil.copytree(args.store, store)  # the tasks write: never into the user's store
    seconds: dict[str, float] = defaultdict(float)
    undo = timed_io(seconds)
    rows = {}
    try:
        vol = open_image(store)
        shape = tuple(args.block_shape) if args.block_shape else None
        if args.quick and shape is None:
            shape = (2, 256, 256)  # two blocks of the quick phantom
        grid = block_grid(vol, RunSettings(block_shape=shape), ("segment", "refine"),
                          min_blocks=count + 1)
        root = open_target(store, vol.multiscale, None).root
        # refine first: segment with overwrite resets its record, which refine needs done
        for stage, plan in (("refine", plan_refine), ("segment", plan_segment)):
            _, tasks, _ = plan(vol, root, grid, overwrite=True)
            if len(tasks) < count + 1:
                raise SystemExit(f"{stage}: {len(tasks)} blocks; need {count + 1} "
                                 "(a smaller --block-shape or a larger store)")
            run_task(tasks[0].fn, *tasks[0].args)  # warm-up: model loading
            seconds.clear()
            start = time.perf_counter()
            for task in tasks[1:count + 1]:
                run_task(task.fn, *task.args)
            total = time.perf_counter() - start
            read, write = seconds["read"], seconds["write"]
            rows[stage] = {"blocks": count, "block": grid.block, "seconds": total,
                           "read_s": read, "write_s": write,
                           "compute_s": total - read - write,
                           "read_share": read / total, "write_share": write / total}
            print(f"{stage:<8} {count} blocks of {'x'.join(map(str, grid.block))}: "
                  f"{total:6.1f} s; read {read:5.2f} s ({read / total:5.1%}), "
                  f"write {write:5.2f} s ({write / total:5.1%})", flush=True)
    finally:
        undo()
        shutil.rmtree(work, ignore_errors=True)
    payload = {"machine": machine(), "store": args.store, "torch_threads": 1, "stages": rows,
               "command": command("block_io", argv)}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
