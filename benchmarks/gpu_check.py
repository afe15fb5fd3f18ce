"""One-command GPU check: the gpu-marked tests, the ensemble's and the MAE's throughput on the
GPU, and a short training run of each model (with and without batches made ahead), into one
JSON.

    python -m benchmarks.gpu_check --out DIR [--device cuda|cuda:N|cpu] [--budget S] [--quick]
    make gpu-check                  # the same, into build/gpu-check

Writes ``DIR/gpu_check.json``: the device (name, memory, capability), torch's and CUDA's
versions, its matrix-product rate, and per step its status (passed, failed or skipped, with
the reason), its seconds and its numbers: the ensemble's voxels/s in fp32 and bf16
(``benchmarks.ensemble_throughput``), the MAE's tiles/s per mode (``benchmarks.mae_throughput``,
on tiles of a made-up scene), each training run's steps/s, first and last epoch loss, and
whether its file loads and runs on the CPU. Beside it: ``gpu-tests.xml`` and ``gpu-tests.log``
(pytest), ``ensemble_throughput.json``, the trained models. Exit status 1 when a step failed.

Without CUDA (or with ``--device cpu``) the same steps run on the CPU with reduced sizes (the
gpu-marked tests then skip): 2 cores take about a minute. On one H100/H200 the whole check takes
a few minutes; each step has a time budget (training stops at it and fails), and ``--budget``
(default 540 s) caps the sum, so that it ends inside 10 minutes.

What it needs: the repository (run from its root) and Python >= 3.11 with torch (CUDA), numpy,
scipy, safetensors and pytest — what a GPU machine's PyTorch image holds. The throughput steps
and the refiner's training import only torch/numpy parts of volref. The gpu-marked tests
(pytest loads ``tests/conftest.py``: Dask, zarr) and the segmenter's training (its data module
reads OME-Zarr) also need what the tests import beyond such an image: the wheels of dask,
distributed, zarr, numcodecs, donfig, google-crc32c, partd, locket, tblib, zict, tornado,
ome-zarr-models, pydantic, pydantic-core, pydantic-zarr, annotated-types, typing-inspection and
platformdirs (Python 3.12 manylinux wheels, installed with ``pip install --no-deps``; the list is
what running those tests imported on a CPU machine, less a PyTorch image's packages); where
they are missing those two steps are skipped and say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine, matrix_rates, summary, synchronize

ROOT = Path(__file__).resolve().parents[1]

#: what the gpu-marked tests and the segmenter's training import beyond a PyTorch image
NEEDS_WHEELS = ("dask", "distributed", "zarr", "numcodecs", "ome_zarr_models", "pydantic",
                "hypothesis")


class Skipped(Exception):
    """A step that cannot run here (its reason says why)."""


class OverBudget(Exception):
    """A training run that went past its step's time budget."""


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the GPU's sizes, the CPU fallback's and the smallest (--quick)."""

    ensemble_batch: int
    ensemble_repeats: int
    mae_slices: int  # made-up slices of mae_size x mae_size for the MAE's tiles
    mae_size: int
    mae_max_tiles: int
    mae_modes: tuple[str, ...]
    mae_repeats: int
    matrix_n: int
    segmenter: dict[str, Any]  # SegmenterRecipe fields (unet: UNetConfig fields)
    refiner: dict[str, Any]  # RefinerRecipe fields (mae: MAEConfig fields)
    compare_steps: int  # refiner steps timed with and without prefetching (0: not compared)
    toy_shape: tuple[int, int, int]  # the segmenter's made-up training volume
    #: the CPU fallback times volref's predict alone on one window this wide (None: the
    #: whole ensemble_throughput table on SegmentSettings' 320-px windows)
    ensemble_window: int | None = None
    #: seconds each step may take (training stops at its budget)
    budgets: dict[str, float] = dataclasses.field(default_factory=dict)


TINY_UNET = {"base": 4, "levels": 2}
TINY_MAE = {"tile": 32, "width": 32, "depth": 2, "heads": 2, "decoder_width": 16,
            "decoder_depth": 1, "decoder_heads": 2}
ALL_MODES = ("per_tile_loop", "per_tile_loop_sdpa", "batched_torch_softmax", "batched",
             "batched_skipping", "batched_skipping_centre")

SIZES = {
    "gpu": Sizes(ensemble_batch=32, ensemble_repeats=5, mae_slices=2, mae_size=1024,
                 mae_max_tiles=512, mae_modes=ALL_MODES, mae_repeats=3, matrix_n=8192,
                 segmenter={"members": 2, "epochs": 3, "steps_per_epoch": 60, "batch": 32,
                            "crop": 128, "bf16": True},
                 refiner={"epochs": 3, "steps_per_epoch": 40, "batch": 32, "crop": 128,
                          "lr": 5e-4},
                 compare_steps=30, toy_shape=(24, 512, 512),
                 budgets={"environment": 30, "gpu_tests": 240, "ensemble_throughput": 60,
                          "mae_throughput": 60, "train_segmenter": 90, "train_refiner": 90}),
    "cpu": Sizes(ensemble_batch=1, ensemble_repeats=1, mae_slices=1, mae_size=256,
                 mae_max_tiles=8, mae_modes=("batched", "batched_skipping"), mae_repeats=1,
                 matrix_n=512,
                 segmenter={"members": 1, "epochs": 3, "steps_per_epoch": 8, "batch": 4,
                            "crop": 64, "lr": 1e-2, "unet": TINY_UNET},
                 refiner={"epochs": 3, "steps_per_epoch": 10, "batch": 8, "crop": 32,
                          "lr": 2e-3, "mae": TINY_MAE, "bf16": False},
                 compare_steps=0, toy_shape=(6, 128, 128), ensemble_window=128,
                 budgets={"environment": 20, "gpu_tests": 60, "ensemble_throughput": 30,
                          "mae_throughput": 30, "train_segmenter": 30, "train_refiner": 30}),
}
SIZES["quick"] = dataclasses.replace(
    SIZES["cpu"], mae_max_tiles=2, mae_modes=("batched",),
    segmenter={**SIZES["cpu"].segmenter, "epochs": 2, "steps_per_epoch": 4},
    refiner={**SIZES["cpu"].refiner, "epochs": 2, "steps_per_epoch": 5},
    toy_shape=(4, 96, 96), ensemble_window=64)


# ---------------------------------------------------------------- made-up data


def toy_classes(shape: tuple[int, int, int], seed: int, count: int | None = None) -> np.ndarray:
    """Classes ``(z, y, x)`` uint8 of a made-up scene: elongated mitochondria (matrix, an IMS
    rim, cristae across the short axis) growing and shrinking through z. numpy only (a GPU
    machine without Dask cannot make volref's phantoms)."""
    from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    count = count or max(2, ny * nx // 2000)
    out = np.full(shape, BACKGROUND, dtype=np.uint8)
    for _ in range(count):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        a, b = rng.uniform(14, 40), rng.uniform(7, 13)
        angle = rng.uniform(0, np.pi)
        cz, rz = rng.uniform(0, nz), rng.uniform(nz / 2, nz * 1.5)
        y0, y1 = max(0, int(cy - a) - 1), min(ny, int(cy + a) + 2)  # the ellipse's box
        x0, x1 = max(0, int(cx - a) - 1), min(nx, int(cx + a) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        for z in range(nz):
            s = 1.0 - ((z - cz) / rz) ** 2
            if s <= 0.2:
                continue
            r = np.sqrt((u / (a * s)) ** 2 + (v / (b * s)) ** 2)
            inside = r < 1.0
            box = out[z, y0:y1, x0:x1]
            box[inside] = MATRIX
            box[inside & (np.mod(u, 7.0) < 2.0) & (r < 0.8)] = CRISTAE
            box[inside & (r >= 0.8)] = IMS
    return out


def toy_image(classes: np.ndarray, seed: int) -> np.ndarray:
    """A normalised image of ``toy_classes``: a level per class plus noise."""
    levels = np.array([0.0, 1.6, 2.4, 1.0], dtype=np.float32)
    rng = np.random.default_rng(seed)
    return levels[classes] + rng.normal(0, 0.5, classes.shape).astype(np.float32)


def toy_uncertainty(classes: np.ndarray, seed: int) -> np.ndarray:
    """Normalised entropy ``classes.shape`` of a made-up ensemble: low, with uncertain spots on
    the mitochondria (where a refiner has patches to rebuild)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    spots = (rng.random(classes.shape) < 0.002) & (classes > 0)
    grown = ndimage.binary_dilation(spots, iterations=5, structure=np.ones((1, 3, 3), bool)
                                    if classes.ndim == 3 else None)
    return np.where(grown, 0.9, 0.02).astype(np.float32)


# ---------------------------------------------------------------- steps


def step_environment(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    info: dict[str, Any] = {"machine": machine(), "device": str(dev),
                            "torch": torch.__version__, "cuda": torch.version.cuda,
                            "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = "cpu"
    info["matrix_rate_gflop_per_s"] = matrix_rates(str(dev), repeats=3, n=sizes.matrix_n)
    return info


def missing_wheels() -> list[str]:
    return [m for m in NEEDS_WHEELS if importlib.util.find_spec(m) is None]


def gpu_test_files() -> list[str]:
    """The test modules holding gpu-marked tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "@gpu_test" in p.read_text())


def step_gpu_tests(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    missing = missing_wheels()
    if missing:
        raise Skipped(f"the tests need the wheels of {', '.join(missing)} (see --help)")
    files = gpu_test_files()
    xml = out / "gpu-tests.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if dev.type == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", str(dev.index or 0))
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
            f"--junitxml={xml}", *files]
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=budget)
    except subprocess.TimeoutExpired as exc:
        (out / "gpu-tests.log").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        raise OverBudget(f"pytest ran past {budget:.0f} s") from None
    (out / "gpu-tests.log").write_text(proc.stdout + proc.stderr)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result: dict[str, Any] = {"files": files, "returncode": proc.returncode, **counts}
    if proc.returncode not in (0, 5) or counts["failures"] or counts["errors"]:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        return {**result, "status": "failed", "reason": f"pytest: {tail}"}
    if counts["passed"] == 0:
        return {**result, "status": "skipped",
                "reason": f"all {counts['skipped']} gpu tests skipped (no CUDA device)"}
    return result


def step_ensemble(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    from benchmarks import ensemble_throughput

    if sizes.ensemble_window:  # the CPU fallback: volref's predict alone, on a smaller window
        return _ensemble_predict(dev, sizes)
    argv = ["--device", str(dev), "--batch", str(sizes.ensemble_batch), "--repeats",
            str(sizes.ensemble_repeats), "--json", str(out / "ensemble_throughput.json")]
    payload = ensemble_throughput.main(argv)
    rows = {k: v for k, v in payload.items() if isinstance(v, dict) and "voxels_per_s" in v}
    return {"batch": payload["batch"], "window": payload["window"],
            "members": payload["members"],
            "voxels_per_s": {k: round(v["voxels_per_s"]) for k, v in rows.items()},
            "gflop_per_s": {k: round(v["gflop_per_s"], 1) for k, v in rows.items()}}


def _ensemble_predict(dev: torch.device, sizes: Sizes) -> dict:
    """voxels/s of ``Ensemble.predict`` in fp32 and bf16 on one ``ensemble_window``-px window
    (``benchmarks.ensemble_throughput``'s timing)."""
    from benchmarks.ensemble_throughput import timed, unet_flops
    from volref.models.precision import DTYPES, in_precision
    from volref.models.registry import DEFAULT_SEGMENTER, load_segmenter

    ensemble = load_segmenter(DEFAULT_SEGMENTER, device=dev)
    w = sizes.ensemble_window
    x32 = torch.randn(sizes.ensemble_batch, ensemble.config.in_slices, w, w, device=dev)
    voxels = sizes.ensemble_batch * w * w
    flops = len(ensemble.members) * unet_flops(ensemble.members[0], tuple(x32.shape))
    speed, rate = {}, {}
    for precision, dtype in DTYPES.items():
        net, x = in_precision(ensemble, precision), x32.to(dtype)
        with torch.no_grad():
            med = float(np.median(timed(lambda n=net, x=x: n.predict(x),
                                        sizes.ensemble_repeats, str(dev))))
        speed[f"volref_predict_{precision}"] = round(voxels / med)
        rate[f"volref_predict_{precision}"] = round(flops / med / 1e9, 1)
    return {"batch": sizes.ensemble_batch, "window": w, "members": len(ensemble.members),
            "voxels_per_s": speed, "gflop_per_s": rate}


def step_mae(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    from benchmarks.mae_throughput import run_mode, tiles_of_slices
    from volref.models.registry import DEFAULT_REFINER, load_refiner
    from volref.stages.refine import RefineSettings

    shape = (sizes.mae_slices, sizes.mae_size, sizes.mae_size)
    classes = toy_classes(shape, seed=11)
    unc = toy_uncertainty(classes, seed=12)
    tiles, uncertain = tiles_of_slices(zip(classes, unc), RefineSettings())
    tiles = sorted(tiles, key=lambda t: -int(t[1].sum()))[:sizes.mae_max_tiles]
    model = load_refiner(DEFAULT_REFINER, device=dev)
    rows: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for _ in range(sizes.mae_repeats):
        for mode in sizes.mae_modes:
            secs, seen, flops, _ = run_mode(model, tiles, mode, str(dev))
            row = rows.setdefault(mode, {"tiles_run": seen, "seconds": [], "flops": flops})
            row["seconds"].append(secs)
        if time.perf_counter() - start > budget / 2:
            break  # one more repeat could pass the budget: medians of what ran
    for row in rows.values():
        med = float(np.median(row["seconds"]))
        row.update(median_s=med, tiles_per_s=len(tiles) / med,
                   gflop_per_s=row.pop("flops") / med / 1e9)
    return {"tiles": len(tiles), "uncertain_area": uncertain, "modes": rows}


class Timer:
    """Training observer: step times, and a stop at the budget."""

    def __init__(self, dev: torch.device, budget: float) -> None:
        self.dev, self.budget = dev, budget
        self.start = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, event: dict) -> None:
        now = time.perf_counter()
        self.times.append(now)
        if now - self.start > self.budget:
            raise OverBudget(f"training ran past {self.budget:.0f} s (step {event['step']} of "
                             f"{event['steps']})")

    def steps_per_s(self) -> float | None:
        """Steady rate: from the end of the first step (warm-up) to the end of the last."""
        if len(self.times) < 3:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _card(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())["card"]


def _trained(card: dict, timer: Timer, batch: int, runs_on_cpu: bool) -> dict:
    losses = card["loss_per_epoch"]
    if isinstance(losses, dict):  # the segmenter: per member
        first = float(np.mean([v[0] for v in losses.values()]))
        last = float(np.mean([v[-1] for v in losses.values()]))
    else:
        first, last = losses[0], losses[-1]
    rate = timer.steps_per_s()
    result = {"device": card["device"], "steps_per_s": rate,
              "samples_per_s": rate * batch if rate else None,
              "first_epoch_loss": first, "last_epoch_loss": last, "runs_on_cpu": runs_on_cpu}
    if not last < first:
        return {**result, "status": "failed", "reason": "the loss did not fall"}
    if not runs_on_cpu:
        return {**result, "status": "failed", "reason": "the file did not run on the CPU"}
    return result


def step_train_segmenter(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    missing = [m for m in ("dask", "zarr") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"volref.train.data reads OME-Zarr: needs the wheels of "
                      f"{', '.join(missing)} (see --help)")
    from volref.models.registry import load_segmenter
    from volref.models.unet import UNetConfig
    from volref.stages.normalise import IntensityRange
    from volref.stages.segment import SegmentSettings, segment_slices
    from volref.train.data import Volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    classes = toy_classes(sizes.toy_shape, seed=21)
    image = toy_image(classes, seed=22)
    vol = Volume(name="made-up", image=image, classes=classes,
                 degraded=np.zeros(classes.shape, bool), intensity=IntensityRange(0.0, 1.0))
    fields = dict(sizes.segmenter)
    recipe = SegmenterRecipe(**{**fields, "unet": UNetConfig(**fields.get("unet", {}))})
    timer = Timer(dev, budget)
    path = train_segmenter([vol], recipe, out / "segmenter", observer=timer, device=dev)
    ensemble = load_segmenter(path, device="cpu")
    settings = SegmentSettings(tile=64, halo=16)
    stack = np.pad(image[:3], ((0, 0), (settings.halo,) * 2, (settings.halo,) * 2), "reflect")
    labels, _ = segment_slices(ensemble, stack, settings)
    runs = labels.shape == (1,) + image.shape[1:]
    return _trained(_card(path), timer, recipe.batch * recipe.members, runs)


def step_train_refiner(dev: torch.device, sizes: Sizes, out: Path, budget: float) -> dict:
    from volref.models.mae import MAEConfig
    from volref.models.registry import load_refiner
    from volref.train.refiner import RefinerRecipe, make_batch, tile_pool, train_refiner

    fields = dict(sizes.refiner)
    mae = MAEConfig(**fields.pop("mae", {}))
    recipe = RefinerRecipe(**fields, mae=mae)
    classes = toy_classes((8, 5 * recipe.crop, 5 * recipe.crop), seed=31)
    pool = tile_pool([(classes, toy_uncertainty(classes, seed=32))], recipe.crop,
                     recipe.min_mito_fraction)
    timer = Timer(dev, budget * 0.7)
    path = train_refiner(pool, recipe, out / "refiner", observer=timer, device=dev)
    model = load_refiner(path, device="cpu")
    labels, mask, _, offset, _ = make_batch(pool, recipe, np.random.default_rng(0))
    with torch.no_grad():
        logits = model(labels, mask, offset)
    result = _trained(_card(path), timer, recipe.batch,
                      tuple(logits.shape) == (recipe.batch, mae.n_classes) + labels.shape[1:])
    result["training_tiles"] = len(pool.labels)
    if sizes.compare_steps:  # the same steps with batches made in the loop, then ahead
        rates = {}
        for depth in (0, 2):
            short = dataclasses.replace(recipe, epochs=1, steps_per_epoch=sizes.compare_steps)
            t = Timer(dev, budget * 0.15)
            train_refiner(pool, short, out / f"refiner-prefetch-{depth}", observer=t,
                          device=dev, prefetch=depth)
            synchronize(str(dev))
            rates[f"prefetch_{depth}"] = t.steps_per_s()
        result["steps_per_s_by_prefetch"] = rates
    return result


STEPS: dict[str, Callable[[torch.device, Sizes, Path, float], dict]] = {
    "environment": step_environment,
    "gpu_tests": step_gpu_tests,
    "ensemble_throughput": step_ensemble,
    "mae_throughput": step_mae,
    "train_segmenter": step_train_segmenter,
    "train_refiner": step_train_refiner,
}


def run_step(name: str, fn: Callable[..., dict], budget: float, *args: Any) -> dict:
    """One step: its result, status (passed / failed / skipped), reason and seconds."""
    print(f"--- {name} (budget {budget:.0f} s)", flush=True)
    start = time.perf_counter()
    if budget <= 0:
        return {"status": "skipped", "reason": "no time left of --budget", "seconds": 0.0}
    try:
        result = fn(*args, budget)
        result.setdefault("status", "passed")
    except Skipped as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failed step is reported, the others still run
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"    {result['status']} in {result['seconds']:.1f} s"
          + (f": {result['reason']}" if "reason" in result else ""), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and what it made")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda:N")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds for all steps together (default 540: inside 10 minutes)")
    ap.add_argument("--quick", action="store_true",
                    help="the CPU fallback's smallest sizes (a smoke run: the test's)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated subset of: {', '.join(STEPS)}")
    args = ap.parse_args(argv)
    from volref.errors import ConfigError
    from volref.train.device import resolve_device

    try:
        dev = resolve_device(args.device)
    except ConfigError as exc:
        ap.error(str(exc))
    kind = "quick" if args.quick else dev.type if dev.type == "cuda" else "cpu"
    kind = "gpu" if kind == "cuda" else kind
    sizes = SIZES[kind]
    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": "python -m benchmarks.gpu_check "
                              + " ".join(sys.argv[1:] if argv is None else argv),
                              "sizes": kind, "device": str(dev), "steps": {}}
    for name in names:
        left = args.budget - (time.perf_counter() - started)
        report["steps"][name] = run_step(name, STEPS[name], min(sizes.budgets[name], left),
                                         dev, sizes, out)
    env = report["steps"].get("environment", {})
    report["device_name"] = env.get("name")
    report["torch"] = torch.__version__
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    statuses = {n: s["status"] for n, s in report["steps"].items()}
    report["passed"] = "failed" not in statuses.values()
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"{'step':<22} {'status':<8} {'seconds':>8}")
    for n, s in report["steps"].items():
        print(f"{n:<22} {s['status']:<8} {s['seconds']:>8.1f}")
    print(f"on {report['device_name'] or dev}, torch {torch.__version__}: "
          f"{'passed' if report['passed'] else 'FAILED'} in {report['total_seconds']:.0f} s; "
          f"wrote {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
