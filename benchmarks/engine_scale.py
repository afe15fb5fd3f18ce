"""The engine's own cost against the number of blocks: 10**3, 10**4 and 10**5 blocks.

    python -m benchmarks.engine_scale [--blocks 1000 10000 100000] [--block-shape 2 32 32]
        [--distributed 1000 10000] [--workers 2] [--workdir DIR] [--quick] [--json OUT]

What runs is volref's engine (block grid, runner, manifests, outputs), its stages and real OME-Zarr
stores; only the models are cheap stand-ins that keep the shapes and the data flow. The input is
the bring-your-own-segmentation path (``volref refine IMAGE --labels ground-truth --uncertainty
uncertainty``): a phantom's ground truth, repeated over the volume, stored as another tool's label
image with the block's chunks, and an uncertainty from a cheap rule (0.16 inside mitochondria, 0
outside: below tau everywhere, so every tile is looked at and none needs the refiner's forward
pass). The refiner is a tiny MAE (random weights, 32-px tiles, so blocks can be 32 px). So
``refine`` reads labels and uncertainty with its halo, runs the tile bookkeeping, writes and
records every block; ``instances`` labels, pairs faces, merges and relabels; ``measure`` gathers
blockwise statistics and measures every mitochondrion; ``publish`` writes the feature table.

Per stage and block count: wall time, client CPU time, time spent inside block functions (when
they run in this process), the engine's overhead (wall less block work), tasks submitted, client
peak resident memory above the start (sampled every 20 ms), manifest record writes and listings,
the union-find's time and peak allocation at that piece count (the peak from a second run of it
under tracemalloc, left out of the stage's times), and
on a distributed scheduler (``dask scheduler`` and ``--workers`` ``dask worker`` processes, so
the client process is only the client) the scheduler's resident memory. A second run on the
finished store (every block recorded) measures resuming: what listing the records costs.

The growth law: least squares of each figure against blocks (``a + b * blocks``), the marginal
cost per block between neighbouring counts, and the log-log exponent of the part above the fixed
cost; the JSON and BENCHMARKS.md say them. ``--project`` adds the projection for the paper's
dataset and a 10**11-voxel archive from these laws and the model rates of the other benchmarks
(:func:`projection`).
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import command, machine, parser, write_json

STAGES = ("refine", "instances", "measure")
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- the input store


#: exact grids for the counts the benchmark uses (z fewer than y and x, as in real stacks)
GRIDS = {100: (4, 5, 5), 1000: (10, 10, 10), 10000: (16, 25, 25), 100000: (40, 50, 50)}


def grid_for(blocks: int) -> tuple[int, int, int]:
    """Block counts (z, y, x) giving ``blocks``: :data:`GRIDS`, else about a cube of blocks
    with y and x equal."""
    if blocks in GRIDS:
        return GRIDS[blocks]
    nz = max(1, round(blocks ** (1 / 3)))
    ny = max(1, round(math.sqrt(blocks / nz)))
    return nz, ny, ny


def base_truth(workdir: Path, depth: int) -> np.ndarray:
    """The ground-truth classes of one small dense phantom (``depth`` x 256 x 256), the tile that
    is repeated over every volume (so content per voxel is the same at every size)."""
    import dask

    from volref.pipeline import write_phantom
    from volref.synth import SynthConfig

    path = workdir / f"base-{depth}.ome.zarr"
    if not (path / "labels").exists():
        cfg = SynthConfig(shape=(depth, 256, 256), seed=11, chunks=(depth, 256, 256),
                          density=8.0, degraded_fraction=0.0)
        with dask.config.set(scheduler="synchronous"):
            dask.compute(write_phantom(cfg, path, overwrite=True))
    import zarr

    from volref.layout import GROUND_TRUTH

    return np.asarray(zarr.open_group(str(path), mode="r")[f"labels/{GROUND_TRUTH}/s0"][:])


def make_store(path: Path, counts: tuple[int, int, int], block: tuple[int, int, int],
               base: np.ndarray) -> tuple[int, int, int]:
    """An OME-Zarr image of ``counts`` blocks of ``block`` (chunks = block, 3 levels; the image
    itself all background, so stored as no chunks) with ``labels/ground-truth`` (the base
    phantom's classes repeated) and ``uncertainty`` (uint8: 40/255 inside mitochondria)."""
    from volref.classes import CLASS_COLORS, CLASS_PROPERTIES
    from volref.io import (
        Axis,
        LabelInfo,
        create_label_image,
        create_multiscale,
        label_levels,
        open_group,
        open_image,
        pyramid_geometry,
    )

    shape = tuple(c * b for c, b in zip(counts, block))
    reps = [-(-n // b) for n, b in zip(shape, base.shape)]
    truth = np.tile(base, reps)[: shape[0], : shape[1], : shape[2]]
    unc = (truth > 0).astype(np.uint8) * np.uint8(40)
    if path.exists():
        shutil.rmtree(path)
    root = open_group(path, mode="w-", zarr_format=3)
    axes = tuple(Axis(a, "space", "micrometer") for a in "zyx")
    levels = pyramid_geometry(shape, (0.05, 0.01, 0.01), 3, block, np.uint8, "0.5",
                              method="nearest")
    create_multiscale(root, levels, axes, version="0.5", name="image", method="mean")
    ms = open_image(path).multiscale
    _, labels = create_label_image(root, "ground-truth", label_levels(ms, "uint8"), ms.axes,
                                   version="0.5", info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES))
    uncertainty = create_multiscale(root.create_group("uncertainty"), levels, axes,
                                    version="0.5", name="uncertainty", method="nearest")
    # written whole, level by level (nearest: every other voxel in y and x); a Dask graph of
    # 10**5 chunks would take minutes to schedule
    for data, arrays in ((truth, labels), (unc, uncertainty)):
        for k, array in enumerate(arrays):
            array[...] = data[:, :: 2**k, :: 2**k][tuple(slice(0, n) for n in array.shape)]
    return shape  # type: ignore[return-value]


def tiny_refiner(path: Path) -> Path:
    """A tiny MAE with random weights and 32-px tiles (its forward pass never runs here)."""
    import torch

    from volref.models.checkpoint import save_model
    from volref.models.mae import MAEConfig, MaskedAutoencoder
    from volref.models.registry import REFINER_KIND

    if not path.exists():
        torch.manual_seed(0)
        cfg = MAEConfig(tile=32, width=16, depth=1, heads=2, decoder_width=8, decoder_depth=1,
                        decoder_heads=2)
        save_model(path, MaskedAutoencoder(cfg).eval(), REFINER_KIND, cfg.to_dict())
    return path


# ---------------------------------------------------------------- measuring


def rss() -> int:
    """This process's resident memory now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples this process's resident memory every ``interval`` s; ``peak`` since ``reset``."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, rss(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def reset(self) -> int:
        self.peak = now = rss()
        return now

    def read(self) -> int:
        self.peak = max(self.peak, rss())
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Tally:
    """Calls and seconds of a few engine functions while a stage runs (wrapped in place for the
    benchmark only, restored after): manifest record writes and listings, the merge."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.merge_peak = 0
        self.pieces = 0
        #: the traced repeat of the merge (its memory), not counted in a stage's times
        self.excluded_cpu = self.excluded_wall = 0.0
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str, traced: bool = False) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                result = original(*args, **kw)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1
            if traced:  # once more under tracemalloc for its peak, left out of the stage's times
                cpu, wall = time.process_time(), time.perf_counter()
                tracemalloc.start()
                try:
                    original(*args, **kw)
                    self.merge_peak = max(self.merge_peak, tracemalloc.get_traced_memory()[1])
                finally:
                    tracemalloc.stop()
                    self.excluded_cpu += time.process_time() - cpu
                    self.excluded_wall += time.perf_counter() - wall
                self.pieces = int(sum(b[0] for b in args[0]))
            return result

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def take(self) -> dict[str, Any]:
        out = {"calls": dict(self.calls), "seconds": {k: round(v, 4)
                                                       for k, v in self.seconds.items()}}
        self.calls, self.seconds = {}, {}
        return out


def counting_executor(client: Any) -> Any:
    """An :class:`~volref.engine.runner.Executor` that counts, in this process, the seconds
    spent inside block functions (it counts its tasks itself)."""
    from volref.engine.runner import Executor

    class Counting(Executor):  # tasks: the executor's own count (blocks, batches) + graphs'
        inside = 0.0

        def compute(self, work: Any) -> Any:
            import dask

            self.tasks += len(dask.delayed(list)(work).__dask_graph__()) \
                if isinstance(work, list) else len(work.__dask_graph__())
            return super().compute(work)

        def submit(self, fn: Any, *args: Any, key: str, gpu: bool = False) -> Any:
            if not self.inline:
                return super().submit(fn, *args, key=key, gpu=gpu)

            def timed(*a: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    self.inside += time.perf_counter() - start

            return super().submit(timed, *args, key=key, gpu=gpu)

    return Counting(client)


@contextlib.contextmanager
def dask_processes(workdir: Path, workers: int):
    """A scheduler and ``workers`` single-threaded workers as separate processes; yields a
    client (so this process is only the client)."""
    from distributed import Client

    exe = Path(sys.executable).parent / "dask"
    sched_file = workdir / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    logs = [open(workdir / f"dask-{i}.log", "w") for i in range(workers + 1)]
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    procs = [subprocess.Popen([str(exe), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=logs[0], stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        for i in range(workers):
            procs.append(subprocess.Popen(
                [str(exe), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                 "--no-dashboard", "--memory-limit", "0", "--name", f"w{i}"],
                stdout=logs[i + 1], stderr=subprocess.STDOUT, env=env, start_new_session=True))
        with Client(scheduler_file=str(sched_file), timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
            yield client
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def _scheduler_rss() -> int:
    import resource as res

    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return max(now, res.getrusage(res.RUSAGE_SELF).ru_maxrss * 1024)


def run_stages(image: Path, settings: Any, client: Any, sampler: PeakSampler,
               profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """The stages and publishing, as :func:`volref.pipeline.run.run` chains them (its own loop,
    so each stage can be measured), on ``client`` (None: in this process)."""
    from volref.engine import manifest as manifest_mod
    from volref.engine.cluster import ClusterSpec, connect
    from volref.engine.runner import Executor
    from volref.io import open_image
    from volref.pipeline import instances as instances_mod
    from volref.pipeline.publish import publish
    from volref.pipeline.run import block_grid, lock, stages_of
    from volref.pipeline.stage import StageContext
    from volref.pipeline.store import open_target

    vol = open_image(image)
    target = open_target(image, vol.multiscale, None)
    tally = Tally()
    tally.wrap(manifest_mod.Manifest, "record", "manifest_record")
    tally.wrap(manifest_mod.Manifest, "finished", "manifest_listing")
    tally.wrap(instances_mod, "resolve", "merge", traced=True)
    tally.wrap(Executor, "compute", "pyramids")
    out: dict[str, Any] = {}
    base = sampler.reset()
    try:
        with lock(target.root, target.where), connect(ClusterSpec(workers=0), client) as conn:
            executor = counting_executor(conn.client)
            grid = block_grid(vol, settings, STAGES)
            ctx = StageContext(vol, target.root, grid, settings.overwrite)
            for stage in [*stages_of(settings, STAGES), None]:
                name = stage.name if stage is not None else "publish"
                executor.tasks, executor.inside = 0, 0.0
                tally.merge_peak = tally.pieces = 0
                tally.excluded_cpu = tally.excluded_wall = 0.0
                start, cpu = time.perf_counter(), time.process_time()
                if profile is not None:
                    profile.enable()
                if stage is not None:
                    report = stage.run(ctx, executor, None)
                    computed = report.computed
                else:
                    publish(vol, target.root, executor, own_image=True)
                    computed = 0
                if profile is not None:
                    profile.disable()
                wall = time.perf_counter() - start - tally.excluded_wall
                cpu = time.process_time() - cpu - tally.excluded_cpu
                row: dict[str, Any] = {
                    "wall_s": round(wall, 3), "client_cpu_s": round(cpu, 3),
                    "tasks": executor.tasks, "computed": computed,
                    "client_peak_mib": round((sampler.read() - base) / 2**20, 2),
                    **tally.take()}
                if executor.inline:
                    row["block_work_s"] = round(executor.inside, 3)
                    row["overhead_s"] = round(wall - executor.inside, 3)
                else:
                    row["scheduler_rss_mib"] = round(
                        conn.client.run_on_scheduler(_scheduler_rss) / 2**20, 1)
                if name == "instances":
                    row["merge_pieces"] = tally.pieces
                    row["merge_peak_mib"] = round(tally.merge_peak / 2**20, 2)
                out[name] = row
                print(f"  {name:>9}: {row['wall_s']:8.2f} s wall, {row['client_cpu_s']:8.2f} s "
                      f"client CPU, {row['tasks']:7d} tasks, {row['client_peak_mib']:8.1f} MiB",
                      flush=True)
            out["blocks"] = len(grid)
    finally:
        tally.restore()
    return out


# ---------------------------------------------------------------- growth laws


def law(blocks: list[int], values: list[float]) -> dict[str, Any]:
    """Least squares ``value = a + b * blocks``; marginal cost per block between neighbouring
    counts; the log-log exponent of ``value - a`` (1: linear, above 1: grows faster)."""
    points: dict[int, list[float]] = {}
    for b, v in zip(blocks, values):  # repeated counts: their median
        points.setdefault(b, []).append(float(v))
    x = np.asarray(sorted(points), float)
    y = np.asarray([np.median(points[b]) for b in sorted(points)], float)
    if len(x) < 2:
        return {"per_block": float(y[0] / x[0]) if len(x) else None}
    b, a = np.polyfit(x, y, 1)
    marginal = [float((y[i + 1] - y[i]) / (x[i + 1] - x[i])) for i in range(len(x) - 1)]
    above = y - min(a, 0.0) if a < 0 else y - a
    ok = above > 0
    exponent = float(np.polyfit(np.log(x[ok]), np.log(above[ok]), 1)[0]) if ok.sum() >= 2 \
        else None
    return {"fixed": float(a), "per_block": float(b), "marginal_per_block": marginal,
            "exponent": exponent,
            "max_residual": float(np.max(np.abs(y - (a + b * x)) / np.maximum(np.abs(y), 1e-9)))}


def laws(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    mine = [r for r in rows if r["mode"] == mode and not r.get("resumed")]
    if not mine:
        return {}
    blocks = [r["blocks"] for r in mine]
    out: dict[str, Any] = {}
    for stage in (*STAGES, "publish", "total"):
        for key in ("wall_s", "client_cpu_s", "overhead_s", "client_peak_mib", "tasks"):
            vals = [r["stages"][stage].get(key) for r in mine]
            if all(v is not None for v in vals):
                out.setdefault(stage, {})[key] = law(blocks, vals)
    return out


def totals(stages: dict[str, Any]) -> dict[str, Any]:
    rows = [v for k, v in stages.items() if isinstance(v, dict)]
    out: dict[str, Any] = {}
    for key in ("wall_s", "client_cpu_s", "overhead_s", "block_work_s", "tasks"):
        vals = [r.get(key) for r in rows]
        if all(v is not None for v in vals):
            out[key] = round(sum(vals), 3)
    out["client_peak_mib"] = max(r["client_peak_mib"] for r in rows)
    return out


# ---------------------------------------------------------------- projection

PAPER_VOXELS = 12 * 2048 * 2048 * 150  # 12 stacks of 2048 x 2048 x 150
ARCHIVE_VOXELS = 10**11
#: a default block on such stacks: one 32-slice chunk deep, 512 x 512 (``DEFAULT_BLOCK_XY``)
DEFAULT_BLOCK_VOXELS = 32 * 512 * 512


def model_rates() -> dict[str, Any]:
    """Per-voxel work of ``volref run`` on a 2-core machine, from committed results: the
    end-to-end line of ``benchmarks.engine_scaling`` with the default method
    (``engine_scaling_default.json``) and the MAE's time relative to it end to end
    (``engine_methods.json``), both from one machine; without them, the older estimate
    (:func:`mae_line_rates`)."""
    default, methods = RESULTS / "engine_scaling_default.json", RESULTS / "engine_methods.json"
    if not (default.exists() and methods.exists()):
        return mae_line_rates()
    scaling = json.loads(default.read_text())
    line = scaling["line"]
    ratio = json.loads(methods.read_text())["other_variants"][0]["speedup_of_first"]
    fused = float(line["s_per_mvoxel"])
    return {"fixed_s": float(line["fixed_s"]), "fused_s_per_mvoxel": fused,
            "mae_s_per_mvoxel": fused * ratio, "machine": scaling["machine"],
            "precision": scaling["rows"][0]["resolved"],
            "sources": [f"benchmarks/results/{default.name}", f"benchmarks/results/{methods.name}"]}


def mae_line_rates() -> dict[str, Any]:
    """The older estimate: the end-to-end line of ``benchmarks.engine_scaling`` with ``--method
    mae`` (bf16 on a CPU with native bf16), its refine share, and the fused refinement's cost
    relative to the MAE's in the refine stage (``benchmarks.refine_methods``)."""
    scaling = json.loads((RESULTS / "engine_scaling_caches.json").read_text())
    line = scaling["line"]
    last = max(scaling["rows"], key=lambda r: r["voxels"])
    stages = last["stages_s"]
    refine_share = stages["refine"] / sum(stages.values())
    methods = json.loads((RESULTS / "refine_methods.json").read_text())
    by = {r["method"]: r["wall_s"] for r in methods["rows"]}
    fused = by["fused"] / by["mae"]
    mae = float(line["s_per_mvoxel"])
    return {"fixed_s": float(line["fixed_s"]), "mae_s_per_mvoxel": mae,
            "refine_share": refine_share, "fused_vs_mae_refine": fused,
            "fused_s_per_mvoxel": mae * (1 + refine_share * (fused - 1)),
            "sources": ["benchmarks/results/engine_scaling_caches.json",
                        "benchmarks/results/refine_methods.json"]}


def projection(engine: dict[str, Any], gpu_mvoxel_s: float | None = None) -> dict[str, Any]:
    """Hours for the paper's dataset and a 10**11-voxel archive on N CPU nodes (N = 1, 10, 100;
    a node = this 2-core machine) and N GPUs.

    ``T(N) = fixed + voxels * per_voxel / N + blocks * client_per_block``: the per-voxel work
    (:func:`model_rates`, the default fused method) spreads over the nodes at best linearly;
    the client's cost per block (measured here on the distributed scheduler, the law's slope)
    does not spread. Blocks: the default block shape. GPUs: no GPU rate of volref has been
    measured (``gpu_mvoxel_s``: a measured end-to-end rate per GPU, else left unmeasured).
    """
    rates = model_rates()
    per_block = (engine.get("total", {}).get("client_cpu_s") or {}).get("per_block")
    out: dict[str, Any] = {"rates": rates, "client_s_per_block": per_block,
                           "block_voxels": DEFAULT_BLOCK_VOXELS, "datasets": {}}
    for name, voxels in (("paper_7.5_gvoxel", PAPER_VOXELS), ("archive_1e11", ARCHIVE_VOXELS)):
        blocks = -(-voxels // DEFAULT_BLOCK_VOXELS)
        client = (per_block or 0.0) * blocks
        row: dict[str, Any] = {"voxels": voxels, "blocks": blocks, "client_h": client / 3600}
        for n in (1, 10, 100):
            work = voxels / 1e6 * rates["fused_s_per_mvoxel"] / n
            row[f"cpu_nodes_{n}_h"] = (rates["fixed_s"] + work + client) / 3600
            row[f"gpus_{n}_h"] = None if gpu_mvoxel_s is None else \
                (rates["fixed_s"] + voxels / 1e6 / gpu_mvoxel_s / n + client) / 3600
        out["datasets"][name] = row
    if gpu_mvoxel_s is None:
        out["gpus"] = "unmeasured: no GPU has run volref in this project (pass --gpu-mvoxel-s)"
    return out


def print_projection(proj: dict[str, Any]) -> None:
    r = proj["rates"]
    print(f"per-voxel work (2 cores): mae {r['mae_s_per_mvoxel']:.2f} s/Mvoxel, fused "
          f"{r['fused_s_per_mvoxel']:.2f}; client {1e3 * (proj['client_s_per_block'] or 0):.2f} "
          f"ms a block of {proj['block_voxels']} voxels")
    print("| dataset | blocks | 1 node h | 10 nodes h | 100 nodes h | client h | GPUs |")
    for name, row in proj["datasets"].items():
        gpu = "unmeasured" if row["gpus_1_h"] is None else \
            f"{row['gpus_1_h']:.2f} / {row['gpus_10_h']:.2f} / {row['gpus_100_h']:.2f} h"
        print(f"| {name} | {row['blocks']} | {row['cpu_nodes_1_h']:.1f} | "
              f"{row['cpu_nodes_10_h']:.2f} | {row['cpu_nodes_100_h']:.3f} | "
              f"{row['client_h']:.4f} | {gpu} |")


# ---------------------------------------------------------------- main


def one_point(args: Any, workdir: Path, target: int, mode: str, base: np.ndarray,
              sampler: PeakSampler, profile: bool = False) -> list[dict[str, Any]]:
    from volref.pipeline.run import RunSettings
    from volref.stages.settings import LabelSettings, RefineSettings

    block = tuple(args.block_shape)
    counts = grid_for(target)
    image = workdir / f"scale-{target}-{mode}.ome.zarr"
    start = time.perf_counter()
    shape = make_store(image, counts, block, base)
    made = time.perf_counter() - start
    print(f"{target} blocks ({mode}): {counts} of {block} = {shape}; store made in {made:.1f} s",
          flush=True)
    settings = RunSettings(refiner=str(tiny_refiner(workdir / "mae-tiny.safetensors")),
                           method="mae", block_shape=block,
                           labels=LabelSettings("ground-truth", uncertainty="uncertainty"),
                           refine=RefineSettings(tile=32, stride=16, near_px=4.0))
    rows = []
    for resumed in (False, True):
        prof = cProfile.Profile() if profile and not resumed else None
        with contextlib.ExitStack() as stack:
            client = None
            if mode == "distributed":
                client = stack.enter_context(dask_processes(workdir, args.workers))
            stages = run_stages(image, settings, client, sampler, prof)
        blocks = stages.pop("blocks")
        stages["total"] = totals(stages)
        row = {"mode": mode, "blocks": blocks, "grid": list(counts), "shape": list(shape),
               "block": list(block), "voxels": int(np.prod(shape)), "resumed": resumed,
               "store_made_s": round(made, 1), "stages": stages}
        if prof is not None:
            text = io.StringIO()
            prof.dump_stats(str(workdir / f"profile-{target}-{mode}.prof"))
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(15)
            row["profile_top"] = [line for line in text.getvalue().splitlines() if line.strip()]
        t = stages["total"]
        print(f"  {'resumed' if resumed else 'total':>9}: {t['wall_s']:8.2f} s wall, "
              f"{1e3 * t['wall_s'] / blocks:.3f} ms a block; peak {t['client_peak_mib']:.1f} MiB "
              f"({1024 * t['client_peak_mib'] / blocks:.2f} KiB a block)", flush=True)
        rows.append(row)
    shutil.rmtree(image, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "100 and 250 blocks in this process, 100 on the distributed "
                "scheduler (under a minute)")
    ap.add_argument("--blocks", type=int, nargs="*", default=[1000, 10000, 100000],
                    help="block counts run in this process")
    ap.add_argument("--distributed", type=int, nargs="*", default=[1000, 10000],
                    help="block counts also run on a distributed scheduler")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block-shape", type=int, nargs=3, default=[2, 32, 32])
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="block counts whose runs are profiled (cProfile of this process, top 25)")
    ap.add_argument("--project", action="store_true", help="add the projection (needs the "
                    "committed results of benchmarks.engine_scaling)")
    ap.add_argument("--gpu-mvoxel-s", type=float, default=None,
                    help="a GPU's end-to-end Mvoxel/s, if one was measured (else: unmeasured)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge the rows of earlier results (points run one at a "
                    "time) and fit the laws over them")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    if args.merge:
        merged = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = sorted((r for m in merged for r in m["rows"]),
                      key=lambda r: (r["mode"], r["blocks"], r["resumed"]))
        finish(args, argv, rows, merged[0]["machine"],
               [m["command"] for m in merged])
        return
    if args.quick:
        args.blocks, args.distributed = [100, 250], [100]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="engine-scale-")))
        workdir.mkdir(parents=True, exist_ok=True)
        base = base_truth(workdir, 2 * args.block_shape[0] if args.quick else 16)
        sampler = PeakSampler()
        rows: list[dict[str, Any]] = []
        try:
            for target in sorted(set(args.blocks) | set(args.distributed)):
                if target in args.blocks:
                    rows += one_point(args, workdir, target, "inline", base, sampler,
                                      profile=target in args.profile)
                if target in args.distributed:
                    rows += one_point(args, workdir, target, "distributed", base, sampler,
                                      profile=target in args.profile)
                if args.json:  # each point as it ends: a long run stopped early keeps them
                    Path(f"{args.json}.partial").write_text(json.dumps({
                        "machine": machine(), "rows": rows,
                        "command": command("engine_scale", argv)}, indent=1))
        finally:
            sampler.close()
    finish(args, argv, rows, machine())


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Per block: wall, client CPU and overhead (ms), client peak above the start (KiB), tasks."""
    print("| mode | blocks | stage | wall ms | client CPU ms | overhead ms | peak KiB | tasks |")
    for r in rows:
        n = r["blocks"]
        for stage, v in r["stages"].items():
            over = v.get("overhead_s")
            print(f"| {r['mode']}{' resumed' if r['resumed'] else ''} | {n} | {stage} | "
                  f"{1e3 * v['wall_s'] / n:.3f} | {1e3 * v['client_cpu_s'] / n:.3f} | "
                  f"{'' if over is None else f'{1e3 * over / n:.3f}'} | "
                  f"{1024 * v['client_peak_mib'] / n:.2f} | {v['tasks'] / n:.2f} |")


def finish(args: Any, argv: list[str] | None, rows: list[dict[str, Any]], where: dict[str, Any],
           runs: list[str] | None = None) -> None:
    """Fit the laws over ``rows``, print them (and the projection), write the JSON."""
    result: dict[str, Any] = {
        "machine": where, "block": args.block_shape, "workers": args.workers,
        "rows": rows, "laws": {m: laws(rows, m) for m in ("inline", "distributed")},
        "command": command("engine_scale", argv)}
    if runs:
        result["runs"] = runs
    print_rows(rows)
    for mode, found in result["laws"].items():
        total = found.get("total", {})
        for key in ("wall_s", "client_cpu_s", "overhead_s", "client_peak_mib"):
            if key in total and "fixed" in total[key]:
                f = total[key]
                unit = ("KiB", 1024) if key == "client_peak_mib" else ("ms", 1e3)
                print(f"{mode} total {key}: {f['fixed']:.2f} + {unit[1] * f['per_block']:.3f} "
                      f"{unit[0]} a block (marginal: "
                      f"{', '.join(f'{unit[1] * m:.3f}' for m in f['marginal_per_block'])}; "
                      f"exponent {f['exponent'] if f['exponent'] is None else round(f['exponent'], 2)})")
    if args.project:
        engine = result["laws"]["distributed"] or result["laws"]["inline"]
        result["projection"] = projection(engine, args.gpu_mvoxel_s)
        print_projection(result["projection"])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
