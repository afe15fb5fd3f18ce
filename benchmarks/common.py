"""Helpers shared by the benchmark scripts: machine facts, child-process peak memory, JSON."""

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
    import numpy
    import torch
    import zarr

    import volref

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "volref": volref.__version__,
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "zarr": zarr.__version__,
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


def tuning_args(doc: str, values: str, every: int,
                argv: list[str] | None) -> tuple[argparse.Namespace, list[float]]:
    """The options of a setting sweep on a validation phantom: ``--store`` (segmented, with ground
    truth), ``--refiner``, ``--values`` (comma-separated), ``--every`` (N-th slice); ``--quick``
    keeps the first two values on every second of those slices. Returns the parsed options and
    the values as floats."""
    ap = parser(doc, f"two values, every {2 * every}th slice")
    ap.add_argument("--store", required=True)
    ap.add_argument("--refiner", default=None)
    ap.add_argument("--values", default=values)
    ap.add_argument("--every", type=int, default=every)
    args = ap.parse_args(argv)
    swept = [float(v) for v in args.values.split(",")]
    if args.quick:
        swept, args.every = swept[:2], 2 * args.every
    return args, swept


def add_device(ap: argparse.ArgumentParser) -> None:
    """``--device``: where a model benchmark runs (default: the GPU when there is one)."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def command(module: str, argv: list[str] | None) -> str:
    """The command line that made a result (``argv`` None: this process's own arguments)."""
    return f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def default_device() -> str:
    """Where the model benchmarks run unless ``--device`` says: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timings on a GPU must not stop before it ends)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matrix_rates(device: str = "cpu", repeats: int = 5) -> dict[str, float]:
    """Measured matrix-product rate (GFLOP/s) of ``device`` in fp32 and bf16: the ceiling a
    model's achieved GFLOP/s is compared to (n = 2048 on the CPU, 8192 on a GPU)."""
    import statistics

    import torch

    n = 8192 if str(device).startswith("cuda") else 2048
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
