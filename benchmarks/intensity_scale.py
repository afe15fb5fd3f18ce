"""Measure the intensity scale of a segmenter trained on percentile-stretched phantoms, for its
model card: where the background level, one sigma of noise and the stain level (see
:mod:`volref.stages.normalise`) landed on the training phantoms.

    python -m benchmarks.intensity_scale [--workdir /tmp/volref-train] [--write CHECKPOINT] [--json OUT]

The shipped ensemble was trained on ``make weights``' phantoms (48x512x512, density 1.2, seeds
101-104), each stretched to its own 1-99.8 % percentiles of the coarsest level. Per phantom this
writes the phantom (as ``make weights`` does), takes that percentile range ``[lo, hi]`` and the
background level and noise of :mod:`volref.stages.normalise`, and reports ``(level - lo) / (hi -
lo)``, ``noise / (hi - lo)`` and ``(stain - lo) / (hi - lo)``; their means over the phantoms are the scale. With ``--write``
they go into the checkpoint's card as ``intensity`` (the safetensors header and the ``.json``
beside it); the weights are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common import machine, parser, write_json
from volref.io import background_sample, intensity_sample, open_image
from volref.stages.normalise import IntensityScale, background_of, range_of

SEEDS = (101, 102, 103, 104)
PHANTOM = {"shape": (48, 512, 512), "density": 1.2, "degraded_fraction": 0.3,
           "degraded_length_px": (150.0, 350.0)}  # as make weights writes them


def write_synth(store: str, **config) -> str:
    """Write a phantom as ``volref synth`` does (threads, all levels)."""
    import dask

    from volref.pipeline import write_phantom
    from volref.synth import SynthConfig

    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(SynthConfig(**config), store, overwrite=True))
    return store


def measure(store: str) -> dict:
    vol = open_image(store)
    r = range_of(intensity_sample(vol))
    bg = background_of(background_sample(vol))
    width = r.high - r.low
    if bg.stain is None:
        raise SystemExit(f"{store}: no stain above the background to measure")
    return {"store": store, "percentiles": r.to_dict(), "background": bg.to_dict(),
            "background_scaled": (bg.level - r.low) / width, "noise_scaled": bg.noise / width,
            "stain_scaled": (bg.stain - r.low) / width}


def write_card(checkpoint: Path, scale: IntensityScale, note: str) -> None:
    """Put ``scale`` into the card of a safetensors checkpoint and of its ``.json``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), framework="pt") as f:
        raw = dict(f.metadata() or {})
    card = json.loads(raw.get("card", "{}"))
    card["intensity"] = {**scale.to_dict(), "note": note}
    raw["card"] = json.dumps(card)
    tensors = load_file(str(checkpoint))
    save_file(tensors, str(checkpoint), metadata=raw)
    side = checkpoint.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    meta["card"] = {**meta.get("card", {}), "intensity": card["intensity"]}
    side.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "one training phantom of 16x256x256 instead of four of 48x512x512")
    ap.add_argument("--workdir", default="/tmp/volref-train",
                    help="where the phantoms are written")
    ap.add_argument("--write", default=None, help="checkpoint whose card gets the scale")
    args = ap.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in SEEDS[:1] if args.quick else SEEDS:
        store = str(Path(args.workdir) / f"train-{seed}{'-quick' if args.quick else ''}.ome.zarr")
        config = {**PHANTOM, "seed": seed}
        if args.quick:
            config["shape"] = (16, 256, 256)
        write_synth(store, **config)
        rows.append(measure(store))
        r = rows[-1]
        print(f"seed {seed}: percentiles {r['percentiles']['low']:.1f}..{r['percentiles']['high']:.1f}"
              f"  background {r['background']['level']:.1f} noise {r['background']['noise']:.2f}"
              f"  -> background {r['background_scaled']:.4f}, noise {r['noise_scaled']:.4f}"
              f", stain {r['stain_scaled']:.4f}")
    scale = IntensityScale(
        background=round(float(np.mean([r["background_scaled"] for r in rows])), 4),
        noise=round(float(np.mean([r["noise_scaled"] for r in rows])), 4),
        stain=round(float(np.mean([r["stain_scaled"] for r in rows])), 4))
    print(f"scale: background {scale.background}, noise {scale.noise}, stain {scale.stain}")
    if args.write:
        write_card(Path(args.write), scale,
                   "measured by benchmarks.intensity_scale on the training phantoms (seeds "
                   f"{', '.join(map(str, SEEDS))}) against the percentile mapping trained with")
        print(f"wrote the scale into {args.write}")
    write_json(args.json, {"machine": machine(), "quick": args.quick, "phantoms": rows,
                           "scale": scale.to_dict()})


if __name__ == "__main__":
    main()
