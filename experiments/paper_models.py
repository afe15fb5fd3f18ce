"""The paper's model experiments on held-out phantoms: ensemble Dice, uncertainty under
degradation (§4.3), Table 1 (reconstruction Dice vs masking ratio), and Dice inside degraded
regions before and after refinement (against ground truth, which the paper did not have).

    python -m experiments.paper_models --workdir /tmp/heldout --out docs/results
    python -m experiments.paper_models --quick --workdir /tmp/q --out /tmp/q  # a smoke run

Held-out phantoms use seeds never used in training (training uses 101-104): for each seed S a
clean phantom and the same phantom with a degraded area along every mitochondrion. Results that
already exist in the stores are reused only when their provenance names the same model file
hash; otherwise they are recomputed. Writes ``OUT/models.json`` and ``OUT/models.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import dask
import numpy as np
import zarr

from benchmarks.common import machine, summary
from experiments.common import refine_slice
from experiments.models import (
    clear_tiles,
    reconstruction_dice,
    segmentation_dice,
    uncertainty_under_degradation,
)
from volref.classes import CLASS_NAMES
from volref.engine.cluster import ClusterSpec
from volref.models.registry import DEFAULT_REFINER, DEFAULT_SEGMENTER, file_hash, load_refiner
from volref.pipeline import write_phantom
from volref.pipeline.run import RunSettings, run
from volref.stages.refine import RefineSettings
from volref.stages.segment import SegmentSettings
from volref.synth import SynthConfig

PAPER_TABLE1 = {0.1: 0.97, 0.25: 0.97, 0.5: 0.95, 0.75: 0.92, 0.9: 0.86}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--workdir", required=True, help="where held-out phantoms live or are made")
    ap.add_argument("--out", default=None, help="folder for models.json and models.md")
    ap.add_argument("--segmenter", default=str(DEFAULT_SEGMENTER))
    ap.add_argument("--refiner", default=str(DEFAULT_REFINER))
    ap.add_argument("--seeds", type=int, nargs="+", default=[999, 998, 997])
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 1024, 1024])
    ap.add_argument("--tiles", type=int, default=160, help="tiles per masking ratio (Table 1)")
    ap.add_argument("--every", type=int, default=4,
                    help="refine every N-th slice of the first degraded phantom (CPU budget)")
    ap.add_argument("--quick", action="store_true",
                    help="one 4x256x256 phantom, 8 tiles, every 2nd slice (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.shape, args.tiles, args.every = args.seeds[:1], [4, 256, 256], 8, 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    seg_hash, ref_hash = file_hash(args.segmenter), file_hash(args.refiner)
    start = time.perf_counter()

    before, after, inst, deg = [], [], [], []
    clear_dice, degraded_dice = [], {"initial": [], "refined": []}
    table1_tiles = None
    for seed in args.seeds:
        clean = _phantom(work, seed, args.shape, 0.0)
        degraded = _phantom(work, seed, args.shape, 1.0)
        for p in (clean, degraded):
            _segmented(p, args.segmenter, seg_hash)
        c, d = zarr.open_group(clean, mode="r"), zarr.open_group(degraded, mode="r")
        gt = c["labels/ground-truth/s0"][:]
        clear_dice.append((c["labels/volref-initial/s0"][:], gt))
        before.append(c["volref/uncertainty/s0"][:].astype(np.float32) / 255)
        after.append(d["volref/uncertainty/s0"][:].astype(np.float32) / 255)
        inst.append(d["labels/ground-truth-instances/s0"][:])
        deg.append(d["labels/degraded/s0"][:])
        if table1_tiles is None:
            table1_tiles = clear_tiles(c["labels/volref-initial/s0"][:], None, before[-1],
                                       max_tiles=args.tiles, seed=seed)
        if seed == args.seeds[0]:
            for method, pred, truth, region in _refine_sample(degraded, args.refiner,
                                                              args.every):
                degraded_dice[method].append((pred, truth, region))

    result = {
        "benchmark": "paper_models",
        "command": "python -m experiments.paper_models " + " ".join(shlex.quote(a) for a in
                                                                  (argv or sys.argv[1:])),
        "machine": machine(),
        "segmenter": {"path": args.segmenter, "sha256": seg_hash},
        "refiner": {"path": args.refiner, "sha256": ref_hash},
        "heldout": {"seeds": args.seeds, "shape": args.shape},
        "every": args.every,
        "ensemble_dice_clear": segmentation_dice(
            np.concatenate([p.ravel() for p, _ in clear_dice]),
            np.concatenate([t.ravel() for _, t in clear_dice]), None),
        "uncertainty_under_degradation": uncertainty_under_degradation(
            np.concatenate([b.ravel() for b in before]), np.concatenate([a.ravel() for a in after]),
            _unique_ids(inst), np.concatenate([x.ravel() for x in deg])),
        "table1": [],
        "degraded_dice": {},
    }
    refiner = load_refiner(args.refiner)
    for ratio, paper in PAPER_TABLE1.items():
        r = reconstruction_dice(refiner, table1_tiles, ratio, seed=0)
        r["paper"] = paper
        result["table1"].append(r)
    for method, triples in degraded_dice.items():
        pred = np.concatenate([p[r] for p, _, r in triples])
        truth = np.concatenate([t[r] for _, t, r in triples])
        result["degraded_dice"][method] = segmentation_dice(pred, truth, None)
    result["seconds"] = time.perf_counter() - start
    _report(result, args.out)


def _phantom(work: Path, seed: int, shape, fraction: float) -> Path:
    """The held-out phantom, made (again) unless one with the same settings is there."""
    name = f"{'clean' if fraction == 0 else 'degraded'}-{seed}.ome.zarr"
    path = work / name
    cfg = SynthConfig(shape=tuple(shape), seed=seed, density=3.0, degraded_fraction=fraction)
    want = json.loads(json.dumps(cfg.to_dict()))
    try:
        have = zarr.open_group(path, mode="r")["volref"].attrs["volref"]["phantom"]
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError):
        have = None
    if fraction == 0 and have is not None:  # without areas, their settings change no voxel
        have = {k: v for k, v in have.items() if not k.startswith("degraded_")}
        want = {k: v for k, v in want.items() if not k.startswith("degraded_")}
    same = have == want
    if not same:
        with dask.config.set(scheduler="threads"):
            dask.compute(write_phantom(cfg, path, overwrite=path.exists()))
    return path


def _provenance(path: Path, stage: str) -> dict:
    f = path / "volref" / "provenance.json"
    return json.loads(f.read_text()).get(stage, {}) if f.exists() else {}


def _segmented(path: Path, model: str, digest: str) -> None:
    """Segment with ``volref run``'s segment stage (resumes; recomputes when the model or the
    segment settings changed)."""
    done = _provenance(path, "segment")
    same = (done.get("model_sha256") == digest
            and done.get("settings") == json.loads(json.dumps(SegmentSettings().to_dict())))
    run(path, stages=("segment",), cluster=ClusterSpec(workers=0),
        settings=RunSettings(segmenter=model, overwrite=not same))


def _refine_sample(path: Path, model: str, every: int):
    """Initial and refined labels of every ``every``-th slice, refined by the same stage function
    ``volref refine`` uses (a whole 48x1024x1024 volume costs ~20 CPU-minutes)."""
    g = zarr.open_group(path, mode="r")
    mae = load_refiner(model)
    settings = RefineSettings()
    m = settings.margin
    zs = list(range(every // 2, g["s0"].shape[0], every))
    initial = g["labels/volref-initial/s0"].get_orthogonal_selection((zs,))
    unc = g["volref/uncertainty/s0"].get_orthogonal_selection((zs,)).astype(np.float32) / 255
    truth = g["labels/ground-truth/s0"].get_orthogonal_selection((zs,))
    region = g["labels/degraded/s0"].get_orthogonal_selection((zs,)).astype(bool)
    refined = np.stack([refine_slice(mae, np.pad(lab, m), np.pad(u, m), settings).labels
                        for lab, u in zip(initial, unc)])
    return [("initial", initial, truth, region), ("refined", refined, truth, region)]


def _unique_ids(instances: list[np.ndarray]) -> np.ndarray:
    """Concatenate instance volumes with ids made unique across them."""
    out, offset = [], 0
    for x in instances:
        y = x.astype(np.int64)
        y[y > 0] += offset
        offset = int(y.max()) if y.size else offset
        out.append(y.ravel())
    return np.concatenate(out)


def _report(result: dict, out: str | None) -> None:
    ens = result["ensemble_dice_clear"]
    unc = result["uncertainty_under_degradation"]
    lines = [
        "## Ensemble, held-out phantoms, clear regions (Dice vs ground truth)",
        "",
        "| " + " | ".join(CLASS_NAMES) + " | mean |",
        "|" + "---|" * 5,
        "| " + " | ".join(f"{ens['per_class'][c]:.3f}" for c in CLASS_NAMES)
        + f" | {ens['mean']:.3f} |",
        "",
        "## Uncertainty under degradation (paper §4.3)",
        "",
        "| areas | mean before | mean after | rise | paper | lowest decile → top 60 % |",
        "|---|---|---|---|---|---|",
        f"| {unc['areas']} | {unc['mean_before']:.3f} | {unc['mean_after']:.3f} | "
        f"+{unc['relative_rise_percent']:.0f} % | +160 % | "
        f"{unc['lowest_decile_moved_to_top60']}/{unc['lowest_decile_areas']} "
        f"({unc['lowest_decile_moved_to_top60_percent']:.0f} %) |",
        "",
        "## Table 1: reconstruction Dice on clearly stained tiles",
        "",
        "| masking ratio | " + " | ".join(f"{r['ratio']:g}" for r in result["table1"]) + " |",
        "|---|" + "---|" * len(result["table1"]),
        "| volref MAE, as the authors score it: micro Dice, removed pixels within 10 px of a "
        "mitochondrion with uncertainty < 0.1 | "
        + " | ".join(f"{r['micro_dice']['0.1']:.3f}" for r in result["table1"]) + " |",
        "| … same, uncertainty < 0.4 | "
        + " | ".join(f"{r['micro_dice']['0.4']:.3f}" for r in result["table1"]) + " |",
        *[f"| … recall of {c} among those pixels | "
          + " | ".join(f"{r['recall']['0.1'][c]:.3f}" for r in result["table1"]) + " |"
          for c in CLASS_NAMES],
        "| volref MAE, strict: every removed pixel, per-class Dice, mean of 4 classes | "
        + " | ".join(f"{r['mean_dice']:.3f}" for r in result["table1"]) + " |",
        "| volref MAE, whole tile after refilling removed patches | "
        + " | ".join(f"{r['mean_tile_dice']:.3f}" for r in result["table1"]) + " |",
        "| paper | " + " | ".join(f"{r['paper']:.2f}" for r in result["table1"]) + " |",
        "",
        "## Dice inside degraded regions (vs ground truth)",
        "",
        f"Every {result['every']}-th slice of the first degraded phantom.",
        "",
        "| segmentation | mitochondrion | " + " | ".join(CLASS_NAMES) + " |",
        "|---|---|" + "---|" * 4,
    ]
    for method, d in result["degraded_dice"].items():
        lines.append(f"| {method} | {d['mitochondrion']:.3f} | "
                     + " | ".join(f"{d['per_class'][c]:.3f}" for c in CLASS_NAMES) + " |")
    lines += ["", f"Made by: `{result['command']}` ({result['seconds']:.0f} s)", ""]
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "models.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "models.md").write_text(text)
        print(f"wrote {out}/models.json and {out}/models.md")


if __name__ == "__main__":
    main()
