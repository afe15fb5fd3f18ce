"""The instances stage's merge (step 3): every block's pieces joined across block faces into
mitochondria with one id each, at 10**4-10**6 pieces.

    python -m benchmarks.instance_merge [--pieces 10000 100000 1000000] [--repeats 3]
        [--quick] [--json OUT]

Synthetic pieces shaped like the stage's: blocks of ``--per-block`` pieces in a row, each
piece with a unique first-voxel key and a size; between neighbouring blocks, face pairs that
join random pieces (half as many pairs as pieces, so components span several blocks). Times
:func:`volref.stages.instances.resolve` (connected components of a sparse graph, array
operations) beside the dict union-find it replaced (``baseline``, kept here only to compare,
as it ran until 2026-11-30: a Python loop over every piece), medians of ``--repeats``, with the
peak memory Python and NumPy allocate during one call (tracemalloc). Both must give the same
tables; the script checks.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from benchmarks.common import command, machine, parser, write_json
from volref.stages.instances import resolve


def pieces(total: int, per_block: int, seed: int = 0):
    """``(blocks, edges)`` as the stage hands them to ``resolve``."""
    rng = np.random.default_rng(seed)
    n_blocks = max(1, total // per_block)
    keys = rng.permutation(np.arange(n_blocks * per_block, dtype=np.uint64) * np.uint64(97))
    blocks = []
    for b in range(n_blocks):
        k = np.sort(keys[b * per_block:(b + 1) * per_block])
        blocks.append((per_block, k, rng.integers(1, 2000, per_block).astype(np.int64)))
    edges = []
    for b in range(n_blocks - 1):
        pairs = rng.integers(1, per_block + 1, (per_block // 2, 2)).astype(np.uint32)
        edges.append((b, b + 1, np.unique(pairs, axis=0)))
    return blocks, edges


def baseline(blocks, edges, min_voxels: int = 0):
    """The dict union-find over stateless 64-bit ids that step 3 used before (for comparison)."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        root = a
        while parent.get(root, root) != root:
            root = parent[root]
        while a != root:
            nxt = parent.get(a, a)
            parent[a] = root
            a = nxt
        return root

    bases = [i * 2**32 for i in range(len(blocks))]
    for a, b, pairs in edges:
        for la, lb in pairs.tolist():
            ra, rb = find(bases[a] + la), find(bases[b] + lb)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    best: dict[int, int] = {}
    size: dict[int, int] = {}
    roots_per_block = []
    for (n, keys, sizes), base in zip(blocks, bases):
        roots = [find(base + i) for i in range(1, n + 1)]
        roots_per_block.append(roots)
        for r, k, v in zip(roots, keys.tolist(), sizes.tolist()):
            best[r] = min(best.get(r, 2**64), k)
            size[r] = size.get(r, 0) + v
    order = sorted((r for r in best if size[r] >= min_voxels), key=best.__getitem__)
    final = {r: i + 1 for i, r in enumerate(order)}
    tables = [np.array([0] + [final.get(r, 0) for r in roots], dtype=np.uint32)
              for roots in roots_per_block]
    return tables, len(final)


def measure(fn, blocks, edges, repeats: int) -> dict:
    fn(*pieces(100, 10), 0)  # warm-up: imports
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(blocks, edges, 1000)
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    fn(blocks, edges, 1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": float(np.median(seconds)), "all_seconds": seconds,
            "peak_mib": peak / 2**20, "out": out}


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "10**3 and 10**4 pieces, one repeat", repeats=3)
    ap.add_argument("--pieces", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--per-block", type=int, default=100, help="pieces per block")
    ap.add_argument("--no-baseline", action="store_true", help="time resolve only")
    args = ap.parse_args(argv)
    if args.quick:
        args.pieces, args.repeats = [1_000, 10_000], 1
    rows = []
    for total in args.pieces:
        blocks, edges = pieces(total, args.per_block)
        new = measure(resolve, blocks, edges, args.repeats)
        row = {"pieces": total, "blocks": len(blocks), "pairs": int(sum(len(e[2]) for e in edges)),
               "mitochondria": new["out"][1], "resolve_s": new["seconds"],
               "resolve_peak_mib": new["peak_mib"],
               "resolve_bytes_per_piece": new["peak_mib"] * 2**20 / total}
        if not args.no_baseline:
            old = measure(baseline, blocks, edges, args.repeats)
            same = old["out"][1] == new["out"][1] and all(
                np.array_equal(a, b) for a, b in zip(old["out"][0], new["out"][0]))
            if not same:
                raise SystemExit(f"{total} pieces: resolve and the baseline disagree")
            row.update({"baseline_s": old["seconds"], "baseline_peak_mib": old["peak_mib"],
                        "speedup": old["seconds"] / new["seconds"]})
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()))
    write_json(args.json, {"machine": machine(), "command": command("instance_merge", argv),
                           "per_block": args.per_block, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
