"""MAE refinement throughput: the authors' per-tile loop vs volref's path, dense and with tile
skipping, on the same tiles and weights, side by side in one run.

    python -m benchmarks.mae_throughput [--store STORE] [--slices 2] [--repeats 3]
                                        [--device cpu|cuda] [--quick] [--json OUT]

Runs on the GPU when there is one (``--device``): there the batched modes send batches of 32
tiles (``RefineSettings.batch_for``) and the matrix rate is measured on the GPU.

Tiles are every 128-px tile of the global grid (stride 64) over ``--slices`` z-slices of a store
that ``volref segment`` (or ``run``) has segmented. tiles/s counts every tile of those slices,
whether the model saw it or not. Modes:

* ``per_tile_loop``: the authors' reference pattern: batch 1, every tile through the model, fp32,
  attention written out as in their code (timm's ``Attention`` of the MAE repository:
  ``softmax(q @ k.T * scale) @ v``);
* ``per_tile_loop_sdpa``: the same loop with volref's fp32 attention
  (``scaled_dot_product_attention``) — a stronger baseline, reported beside it;
* ``batched``: volref's dense path (``RefineSettings()``: bf16 weights, the batch it picks for
  the device — on the CPU one tile per core, side by side; 32 on a GPU), every tile through
  the model;
* ``batched_torch_softmax``: the same with volref's compiled softmax switched off (PyTorch's
  softmax in the attention; what runs where the kernel cannot: ``volref.models.kernels``);
* ``batched_skipping``: volref's path with ``--blend window``: only tiles holding a removed
  patch (and something to rebuild it from);
* ``batched_skipping_centre``: with ``--blend centre``: only tiles whose central 64x64 block
  holds a removed patch — each pixel is rebuilt by one tile instead of four.

``agreement``: the fraction of removed pixels whose class (argmax of one tile's logits) is the
same as in the fp32 per-tile loop. ``uncertain_area``: the fraction of the slices' pixels in
removed patches (uncertainty > tau near a mitochondrion); the issue's skipping target is set for
about 10 %. FLOP counts are multiply-adds x 2 of what each mode computes (``mae_flops``).
glibc's malloc thresholds are pinned first, as volref's workers pin them
(``volref.engine.allocator``): otherwise the authors' fp32 loop runs at 3.5 or 9.6 tiles/s
depending on the process; their kernel caches are capped as there too.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import (
    add_device,
    default_device,
    machine,
    matrix_rates,
    parser,
    store_arg,
    write_json,
)
from volref.models import kernels
from volref.models import mae as mae_module
from volref.models.mae import MAEConfig
from volref.models.precision import in_order, in_precision
from volref.models.registry import DEFAULT_REFINER, load_refiner
from volref.stages.refine import RefineSettings, removal_mask
from volref.stages.segment import uncertainty_from_uint8

MODES = ("per_tile_loop", "per_tile_loop_sdpa", "batched_torch_softmax", "batched",
         "batched_skipping", "batched_skipping_centre")


def mae_flops(config: MAEConfig, visible: int, total: int | None = None) -> float:
    """Multiply-adds x 2 of one tile's forward pass with ``visible`` encoder tokens."""
    c = config
    total = total or c.grid * c.grid

    def stack(d: int, t: int, depth: int) -> float:
        per_layer = 4 * t * d * d + 2 * t * d * int(d * c.mlp_ratio) + 2 * t * t * d
        return 2.0 * depth * per_layer

    token = c.patch * c.patch * c.n_classes
    return (stack(c.width, visible, c.depth) + stack(c.decoder_width, total, c.decoder_depth)
            + stack(c.decoder_width, total, c.image_depth)
            + 2.0 * (visible * token * c.width + visible * c.width * c.decoder_width
                     + total * c.decoder_width * token))


def runs_tile(r: np.ndarray, mode: str) -> bool:
    """Whether ``mode`` sends a tile with removed patches ``r`` (``(g, g)``) through the model."""
    if not mode.startswith("batched_skipping"):
        return True
    if mode.endswith("centre"):
        g = r.shape[0]
        return bool(r[g // 4:3 * g // 4, g // 4:3 * g // 4].any()) and not r.all()
    return bool(r.any()) and not r.all()


def tiles_of(store: str, n_slices: int, settings: RefineSettings):
    """Every tile of ``n_slices`` evenly spaced slices: (labels, removed patches), and the
    fraction of the slices' area in removed patches."""
    import zarr

    root = zarr.open_group(store, mode="r")
    labels = root["labels/volref-initial/s0"]
    unc = root["volref/uncertainty/s0"]
    lead = (0,) * (labels.ndim - 3)
    nz = labels.shape[-3]
    slices = ((np.asarray(labels[lead + (z,)]),
               uncertainty_from_uint8(np.asarray(unc[lead + (z,)])))
              for z in np.linspace(0, nz - 1, n_slices).astype(int))
    return tiles_of_slices(slices, settings)


def tiles_of_slices(slices, settings: RefineSettings):
    """Every tile of the (labels, uncertainty) ``slices`` ``(y, x)``: (labels, removed patches),
    and the fraction of the slices' area in removed patches (no store needed:
    ``benchmarks.gpu_check`` makes its slices)."""
    t, st, m = settings.tile, settings.stride, settings.margin
    out, removed, area = [], 0, 0
    for lab0, unc0 in slices:
        lab = np.pad(lab0, m)
        u = np.pad(unc0, m)
        h, w = lab.shape
        lab = np.pad(lab, ((0, (-h) % t), (0, (-w) % t)))
        u = np.pad(u, ((0, (-h) % t), (0, (-w) % t)))
        remove = removal_mask(lab, u, 4, settings.tau, settings.near_px)
        removed += int(remove.sum()) * 16
        area += lab0.size
        g = t // 4
        for y in range(0, lab.shape[0] - t + 1, st):
            for x in range(0, lab.shape[1] - t + 1, st):
                out.append((lab[y:y + t, x:x + t], remove[y // 4:y // 4 + g, x // 4:x // 4 + g]))
    return out, removed / area


def reference_attention(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention of the authors' code (timm 0.3 ``Attention.forward``), for batch 1."""
    n, t, d = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


@contextlib.contextmanager
def authors_attention():
    saved = mae_module.Attention.forward
    mae_module.Attention.forward = reference_attention
    try:
        yield
    finally:
        mae_module.Attention.forward = saved


@torch.no_grad()
def run_mode(model, tiles, mode: str, device: str = "cpu"
             ) -> tuple[float, int, float, list[np.ndarray]]:
    """Seconds, tiles seen by the model (on ``device``), FLOPs spent, and each seen tile's
    classes of its removed pixels."""
    g2 = (model.config.tile // model.config.patch) ** 2
    todo = [(lab, r) for lab, r in tiles if runs_tile(r, mode)]
    if mode.startswith("per_tile_loop"):
        net, batch = model, 1
    else:
        settings = RefineSettings()
        net, batch = in_precision(model, settings.precision), settings.batch_for(device)
    padded = batch > 1
    flops = sum(mae_flops(model.config, g2 if padded else int((~r).sum()), g2) for _, r in todo)
    ctx = (authors_attention() if mode == "per_tile_loop"
           else kernels.native_off() if mode == "batched_torch_softmax"
           else contextlib.nullcontext())
    lanes = 1 if mode.startswith("per_tile_loop") or padded or device != "cpu" \
        else torch.get_num_threads()

    @torch.no_grad()
    def forward(part):
        labs = np.zeros((batch,) + part[0][0].shape, dtype=part[0][0].dtype)
        masks = np.zeros((batch, g2), dtype=bool)
        for k, (lab, r) in enumerate(part):
            labs[k], masks[k] = lab, r.ravel()
        logits = net(torch.from_numpy(labs).to(device), torch.from_numpy(masks).to(device),
                     pad_to=g2 if padded else None)
        return logits[:len(part)].argmax(dim=1).to(torch.uint8).cpu().numpy()  # waits for it

    with ctx:
        start = time.perf_counter()
        batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        classes = list(in_order(forward, batches, lanes))
        seconds = time.perf_counter() - start
    classes = list(np.concatenate(classes)) if classes else []
    return seconds, len(todo), flops, classes


def removed_pixels(r: np.ndarray, tile: int) -> np.ndarray:
    g = r.shape[0]
    return np.repeat(np.repeat(r, tile // g, axis=0), tile // g, axis=1)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, quick="4 tiles of 1 slice, 1 repeat (a smoke run)", repeats=3)
    ap.add_argument("--store", default=None, help="a segmented store (default: demo/phantom.ome.zarr; with --quick: a small phantom made here)")
    ap.add_argument("--slices", type=int, default=2)
    add_device(ap)
    args = ap.parse_args(argv)
    dev = args.device or default_device()
    if args.quick:
        args.slices, args.repeats = 1, 1
    store_arg(args, tempfile.mkdtemp(prefix="volref-quick-"), default="demo/phantom.ome.zarr")
    from volref.engine.allocator import bounded_kernel_caches, steady_allocator

    allocator = steady_allocator()
    kernel_caches = bounded_kernel_caches()  # as in volref's workers
    settings = RefineSettings()
    model = load_refiner(DEFAULT_REFINER, device=dev)
    tiles, uncertain = tiles_of(args.store, args.slices, settings)
    if args.quick:  # the tiles with the most removed patches
        tiles = sorted(tiles, key=lambda t: -int(t[1].sum()))[:4]
    print(f"{len(tiles)} tiles, uncertain area {100 * uncertain:.1f} %, on {dev}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows, reference = {}, None
    for _ in range(args.repeats):  # modes interleaved, so drifts of a shared machine hit all
        for mode in MODES:
            secs, seen, flops, classes = run_mode(model, tiles, mode, dev)
            row = rows.setdefault(mode, {"tiles": len(tiles), "tiles_run": seen, "seconds": [],
                                         "flops": flops})
            row["seconds"].append(secs)
            if mode == "per_tile_loop":
                reference = classes
            elif "agreement" not in row:
                seen_tiles = [t for t in tiles if runs_tile(t[1], mode)]
                ref = [c for c, t in zip(reference, tiles) if runs_tile(t[1], mode)]
                same = total = 0
                for (_, r), a, b in zip(seen_tiles, classes, ref):
                    px = removed_pixels(r, settings.tile)
                    same += int((a[px] == b[px]).sum())
                    total += int(px.sum())
                row["agreement"] = same / max(total, 1)
    for row in rows.values():
        med = statistics.median(row["seconds"])
        row.update(median_s=med, min_s=min(row["seconds"]), max_s=max(row["seconds"]),
                   tiles_per_s=len(tiles) / med, gflop_per_s=row.pop("flops") / med / 1e9)
    base = rows["per_tile_loop"]["tiles_per_s"]
    print(f"{'mode':<24} {'tiles run':>9} {'median s':>9} {'tiles/s':>8} {'GFLOP/s':>8} "
          f"{'vs loop':>8} {'agree':>7}")
    for mode, row in rows.items():
        row["vs_per_tile_loop"] = row["tiles_per_s"] / base
        print(f"{mode:<24} {row['tiles_run']:>9} {row['median_s']:>9.2f} "
              f"{row['tiles_per_s']:>8.2f} {row['gflop_per_s']:>8.1f} "
              f"{row['vs_per_tile_loop']:>7.2f}x {row.get('agreement', 1.0):>7.4f}")
    payload = {"machine": machine(), "device": dev, "torch_threads": torch.get_num_threads(),
               "native_softmax": kernels.native_softmax() is not None, "allocator": allocator,
               "kernel_caches": kernel_caches,
               "store": args.store, "slices": args.slices, "repeats": args.repeats,
               "uncertain_area": uncertain, "matrix_rate_gflop_per_s": matrix_rates(
                   dev, *((1, 512) if args.quick else ())), **rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
