"""Peak memory and time of ``volref synth`` on a large phantom (bounded memory, chunk by chunk).

    python -m benchmarks.synth_memory                    # 200 x 2048 x 2048 (the issue's figure)
    python -m benchmarks.synth_memory --quick            # 16 x 256 x 256 (a smoke run)
    python -m benchmarks.synth_memory --json out.json

Each size runs once in a fresh process under ``/usr/bin/time -v``; the peak resident set size of
that process is the figure (a 2048 x 2048 x 200 uint16 image alone is 1.6 GB, its labels 2.5 GB).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, run_measured, summary, write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--quick", action="store_true", help="16 x 256 x 256 only (a smoke run)")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--workdir", default=None, help="where to write the phantoms")
    args = parser.parse_args(argv)
    sizes = [(16, 256, 256)] if args.quick else [(64, 512, 512), (200, 2048, 2048)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="volref-bench-"))
    rows = []
    for shape in sizes:
        out = workdir / f"phantom-{'x'.join(map(str, shape))}.ome.zarr"
        cmd = [sys.executable, "-m", "volref.cli.main", "-q", "synth", str(out), "--shape",
               *map(str, shape), "--seed", "1", "--overwrite"]
        r = run_measured(cmd)
        voxels = shape[0] * shape[1] * shape[2]
        r.update(shape=list(shape), voxels=voxels, mvoxel_per_s=voxels / r["wall_s"] / 1e6)
        rows.append(r)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'shape':>18} {'voxels':>14} {'wall s':>8} {'Mvox/s':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{' x '.join(map(str, r['shape'])):>18} {r['voxels']:>14,} {r['wall_s']:>8.1f} "
              f"{r['mvoxel_per_s']:>8.2f} {r['peak_rss_gib']:>9.2f}")
    write_json(args.json, {"benchmark": "synth_memory", "machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
