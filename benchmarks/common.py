"""Helpers shared by the benchmark and experiment scripts: machine facts, child-process peak
memory, JSON, the options they share, the small store ``--quick`` runs use."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def machine() -> dict:
    """Versions and the machine a result was measured on (zarr's version: None where it is not
    installed, as on a GPU machine that runs ``benchmarks.gpu_check`` bare)."""
    import importlib.util

    import numpy
    import torch

    import volref

    zarr = importlib.import_module("zarr") if importlib.util.find_spec("zarr") else None
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "volref": volref.__version__,
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__ if zarr is not None else None,
    }


def run_measured(argv: list[str]) -> dict:
    """Run a command under ``/usr/bin/time -v``: wall seconds and peak resident memory (GiB)."""
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.run(timer + argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}")
    peak_kib = None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if m:
        peak_kib = int(m.group(1))
    return {"argv": argv, "wall_s": wall,
            "peak_rss_gib": peak_kib / 2**20 if peak_kib is not None else None}


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def summary(doc: str) -> str:
    """A script's docstring's first paragraph on one line (its ``--help`` description)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def parser(doc: str, quick: str, repeats: int | None = None) -> argparse.ArgumentParser:
    """The options every benchmark shares: ``--quick`` (what it cuts: ``quick``), ``--json OUT``
    and, for timed loops, ``--repeats N`` (medians are taken over them)."""
    ap = argparse.ArgumentParser(description=summary(doc))
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help="runs per median")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--json", default=None, help="write the results here")
    return ap


def add_device(ap: argparse.ArgumentParser) -> None:
    """``--device``: where a model benchmark runs (default: the GPU when there is one)."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def command(module: str, argv: list[str] | None, package: str = "benchmarks") -> str:
    """The command line that made a result (``argv`` None: this process's own arguments)."""
    return f"python -m {package}.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


#: the phantom of a ``--quick`` run given no store: small, dense, every mitochondrion with a
#: degraded area (seconds to make and run through every stage with the shipped models)
QUICK_PHANTOM = {"shape": (4, 256, 256), "chunks": (2, 128, 128), "seed": 3, "density": 4.0,
                 "degraded_fraction": 1.0}


def quick_store(workdir: str | Path) -> Path:
    """A small phantom in ``workdir`` segmented by ``volref run``'s segment stage (shipped
    models, blocks one by one in this process): what a ``--quick`` smoke run reads when no store
    is given. Made once per ``workdir``."""
    import dask

    from volref.engine.cluster import ClusterSpec
    from volref.pipeline import write_phantom
    from volref.pipeline.run import RunSettings, run
    from volref.synth import SynthConfig

    path = Path(workdir) / "quick.ome.zarr"
    if not (path / "volref" / "uncertainty").exists():
        with dask.config.set(scheduler="synchronous"):
            dask.compute(write_phantom(SynthConfig(**QUICK_PHANTOM), path, overwrite=True))
        run(path, stages=("segment",), cluster=ClusterSpec(workers=0),
            settings=RunSettings(overwrite=True))
    return path


def store_arg(args: argparse.Namespace, workdir: str | Path, default: str | None = None) -> str:
    """``args.store`` (a script's option ``--store`` defaults to None for this); without it
    ``default`` or, for ``--quick``, the quick store made in ``workdir``. Sets ``args.store``."""
    if args.store is None:
        if args.quick:
            args.store = str(quick_store(workdir))
        elif default is not None:
            args.store = default
        else:
            raise SystemExit("--store is needed (or --quick, which makes a small phantom)")
    return str(args.store)


def default_device() -> str:
    """Where the model benchmarks run unless ``--device`` says: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timings on a GPU must not stop before it ends)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matrix_rates(device: str = "cpu", repeats: int = 5, n: int | None = None) -> dict[str, float]:
    """Measured matrix-product rate (GFLOP/s) of ``device`` in fp32 and bf16: the ceiling a
    model's achieved GFLOP/s is compared to (``n`` x ``n`` matrices; default 2048 on the CPU,
    8192 on a GPU)."""
    import statistics

    import torch

    n = n or (8192 if str(device).startswith("cuda") else 2048)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        synchronize(device)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - t)
        out[name] = 2 * n ** 3 / statistics.median(times) / 1e9
    print("matrix product rate: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in out.items()))
    return out
