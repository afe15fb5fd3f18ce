"""Ensemble throughput (voxels/s): one member alone, the K members one after another, the
batched (vmapped) K-member pass, and volref's ``Ensemble.predict`` as it runs on this device,
in fp32 and bf16, side by side in one run.

    python -m benchmarks.ensemble_throughput [--batch 4] [--repeats 5] [--device cpu|cuda]
        [--quick] [--json OUT]

Runs on the GPU when there is one (``--device``; use a larger ``--batch`` there, e.g. 32), and
compares GFLOP/s with the matrix-product rate measured on the same device.

Input: ``--batch`` windows of 3 x 320 x 320 (SegmentSettings: 256-px tiles with a 32-px halo),
random values (speed does not depend on them). Voxels count the tiles' cores (256 x 256 per
window), as the segment stage does; the K members' mean probabilities, labels and uncertainty
stay on the device and only labels and uncertainty come back (``Ensemble.predict``).
FLOPs per voxel are counted from the convolutions (``unet_flops``).
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import (
    add_device,
    default_device,
    machine,
    matrix_rates,
    parser,
    synchronize,
    write_json,
)
from volref.models.precision import DTYPES, in_precision
from volref.models.registry import DEFAULT_SEGMENTER, load_segmenter
from volref.stages.segment import SegmentSettings


def unet_flops(member: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-adds x 2 of one member's convolutions for one input of ``shape`` (N, S, H, W)."""
    total = 0.0

    def hook(mod, _inp, out):
        nonlocal total
        k = mod.weight[0].numel()  # in/groups x kh x kw
        total += 2.0 * out.numel() * k

    handles = [m.register_forward_hook(hook) for m in member.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    with torch.no_grad():
        member(torch.zeros(shape, device=next(member.parameters()).device))
    for h in handles:
        h.remove()
    return total


def timed(fn, repeats: int, device: str = "cpu") -> list[float]:
    fn()  # warm-up
    synchronize(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, quick="1 repeat of a batch of 1 (a smoke run)", repeats=5)
    ap.add_argument("--batch", type=int, default=4)
    add_device(ap)
    args = ap.parse_args(argv)
    dev = args.device or default_device()
    if args.quick:
        args.repeats, args.batch = 1, 1
    s = SegmentSettings()
    w = s.tile + 2 * s.halo
    ensemble = load_segmenter(DEFAULT_SEGMENTER, device=dev)
    k = len(ensemble.members)
    x32 = torch.randn(args.batch, ensemble.config.in_slices, w, w, device=dev)
    voxels = args.batch * s.tile * s.tile
    flops_member = unet_flops(ensemble.members[0], tuple(x32.shape))
    rows = {}
    for precision, dtype in DTYPES.items():
        net = in_precision(ensemble, precision)
        x = x32.to(dtype)
        member = net.members[0]
        modes = {
            "one_member": (lambda m=member, x=x: m(x), 1),
            "members_in_turn": (lambda n=net, x=x: [m(x) for m in n.members], k),
            "batched_ensemble": (lambda n=net, x=x: n.mean_probabilities(x, batched=True), k),
            "volref_predict": (lambda n=net, x=x: n.predict(x), k),
        }
        for mode, (fn, members) in modes.items():
            with torch.no_grad():
                secs = timed(fn, args.repeats, dev)
            med = statistics.median(secs)
            rows[f"{mode}_{precision}"] = {
                "members": members, "precision": precision, "seconds": secs, "median_s": med,
                "min_s": min(secs), "max_s": max(secs), "voxels_per_s": voxels / med,
                "gflop_per_s": members * flops_member / med / 1e9}
    base = rows["batched_ensemble_fp32"]["voxels_per_s"]
    print(f"{args.batch} windows of 3x{w}x{w} ({voxels} voxels), K = {k}, "
          f"{flops_member / (args.batch * s.tile * s.tile):.0f} FLOP per voxel per member, "
          f"on {dev}, {torch.get_num_threads()} threads")
    print(f"{'mode':<26} {'median s':>9} {'Mvoxel/s':>9} {'GFLOP/s':>8} {'vs fp32 ens':>11}")
    for name, row in rows.items():
        row["vs_batched_ensemble_fp32"] = row["voxels_per_s"] / base
        print(f"{name:<26} {row['median_s']:>9.3f} {row['voxels_per_s'] / 1e6:>9.3f} "
              f"{row['gflop_per_s']:>8.1f} {row['vs_batched_ensemble_fp32']:>10.2f}x")
    payload = {"machine": machine(), "device": dev, "torch_threads": torch.get_num_threads(),
               "matrix_rate_gflop_per_s": matrix_rates(
                   dev, *((1, 512) if args.quick else ())),
               "batch": args.batch, "window": w, "core": s.tile, "members": k,
               "flop_per_voxel_per_member": flops_member / voxels, "repeats": args.repeats,
               **rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
