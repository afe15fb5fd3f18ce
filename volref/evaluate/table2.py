"""The paper's Table 2 on phantoms: biological-consistency metrics of implausible tiles before and
after refinement by each method, against a control group of plausible tiles — and, because
phantoms have ground truth, Dice inside the degraded regions for every method.

Tiles (128x128, non-overlapping, on the refinement's global grid) come from every ``every``-th
z-slice of held-out phantoms that ``volref segment`` has run on (``labels/volref-initial``,
``volref/uncertainty``) and that carry ``labels/ground-truth`` and ``labels/degraded``.

Selection rule (documented, deterministic):

* **control** — plausible tiles: no degraded pixel in the tile, at least ``min_mito`` of it
  mitochondrion, and an initial segmentation that ground truth confirms (Dice of the
  mitochondrion mask >= ``control_dice`` and no class with Dice below ``control_class_dice``
  among those present). On phantoms plausibility is checked against the truth, not by eye.
* **implausible** — tiles with at least ``min_mito`` mitochondrion and at least
  ``min_degraded`` of their mitochondrion pixels (by ground truth) in a degraded area, whose
  initial segmentation falls outside the control group's central 90 % (5th-95th percentile) on
  at least one of the five metrics: the initial labels break a rule that plausible tiles keep.

Each method of the registry (:mod:`volref.methods`) refines a window of the slice around the
tile (the tile plus the refinement's context, as ``volref refine`` sees it) and is scored on the
tile: ``mae`` (the paper's method), ``mae-x`` (MAE with an image encoder), ``cnn-ae``
(convolutional denoising autoencoder) and ``crf`` (dense CRF on the ensemble's probabilities and
the image). Metrics are per-tile means with standard errors; a ratio with nothing to measure
(NaN) leaves that tile out of that metric's mean.

Dice against ground truth comes twice: ``dice_degraded``, inside the degraded regions of the
implausible tiles (what refinement exists to repair), and ``dice_whole``, over every evaluated
slice whole, each method run on the whole slice (whether the repair was bought with the rest).
``default_method`` names the method ``volref refine`` runs by default; the verdict measures it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.engine.manifest import Manifest
from volref.errors import VolrefError
from volref.evaluate.methods import MethodSettings, refine_slice, refine_tile
from volref.io import label_names, open_group, open_image
from volref.io.region import read_padded, reflect
from volref.layout import (
    DEGRADED,
    GROUND_TRUTH,
    INITIAL,
    META,
    UNCERTAINTY_PATH,
    finest,
    label_path,
)
from volref.methods import DEFAULT_METHOD, PAPER_CONTROL, PAPER_INITIAL, REGISTRY, table_order
from volref.metrics import METRICS, dice, tile_metrics
from volref.pipeline.intensity import volume_intensity
from volref.stages.normalise import IntensityRange, normalise
from volref.stages.refine import removal_mask
from volref.stages.segment import segment_probabilities
from volref.stages.settings import SegmentSettings

#: the refinement methods, as tables list them (baselines first, the default last)
REFINERS = table_order()
#: the rows of the table: the initial labels, every method, the control tiles and (phantoms only)
#: the ground truth of the implausible tiles: what a perfect refinement would score
METHODS = ("initial", *REFINERS, "control", "truth")
#: below this many control tiles the control's 5th-95th percentiles are not a plausible range
MIN_CONTROL = 20
DICE_KEYS = {"mitochondrion": None, "ims": IMS, "cristae": CRISTAE, "matrix": MATRIX}

#: the paper's Table 2 (METHOD.md): per method, the five metrics' means (from the registry)
PAPER: dict[str, tuple[float, ...]] = {
    "initial": PAPER_INITIAL,
    **{name: row for name in REFINERS if (row := REGISTRY[name].paper) is not None},
    "control": PAPER_CONTROL}


@dataclass(frozen=True)
class Table2Settings:
    tile: int = 128
    every: int = 4  # every N-th z-slice
    min_mito: float = 0.15  # share of the tile that is mitochondrion (initial labels)
    min_degraded: float = 0.10  # share of the tile's true mitochondrion in a degraded area
    control_dice: float = 0.90
    control_class_dice: float = 0.60
    outside: tuple[float, float] = (5.0, 95.0)  # control percentiles that bound "plausible"
    max_tiles: int = 150  # per group, drawn at random (seeded) when more qualify
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SliceData:
    """One z-slice of a held-out phantom, whole (all 2-D, y x)."""

    source: str
    z: int
    image: np.ndarray  # normalised float32
    initial: np.ndarray  # uint8
    uncertainty: np.ndarray  # float32 in [0, 1]
    truth: np.ndarray  # uint8
    degraded: np.ndarray  # bool
    probabilities: Callable[[], np.ndarray] | None = None  # (C, Y, X), computed on demand


@dataclass
class TileRef:
    slice: SliceData
    y: int
    x: int
    metrics: dict[str, float] = field(default_factory=dict)

    def cut(self, a: np.ndarray, t: int) -> np.ndarray:
        return a[..., self.y:self.y + t, self.x:self.x + t]


def candidate_tiles(sl: SliceData, settings: Table2Settings) -> tuple[list[TileRef],
                                                                       list[TileRef]]:
    """(implausible candidates, control candidates) of one slice, before the percentile rule."""
    t = settings.tile
    ny, nx = sl.initial.shape
    implausible, control = [], []
    for y in range(0, ny - t + 1, t):
        for x in range(0, nx - t + 1, t):
            ref = TileRef(sl, y, x)
            ini, tru, deg = ref.cut(sl.initial, t), ref.cut(sl.truth, t), ref.cut(sl.degraded, t)
            if (ini != BACKGROUND).mean() < settings.min_mito:
                continue
            true_mito = tru != BACKGROUND
            if not deg.any():
                if _confirmed(ini, tru, settings):
                    ref.metrics = tile_metrics(ini)
                    control.append(ref)
            elif true_mito.any() and (deg & true_mito).sum() >= settings.min_degraded * \
                    true_mito.sum():
                ref.metrics = tile_metrics(ini)
                implausible.append(ref)
    return implausible, control


def _confirmed(initial: np.ndarray, truth: np.ndarray, settings: Table2Settings) -> bool:
    if dice(initial != BACKGROUND, truth != BACKGROUND) < settings.control_dice:
        return False
    for c in (IMS, CRISTAE, MATRIX):
        if (truth == c).any() and dice(initial == c, truth == c) < settings.control_class_dice:
            return False
    return True


def plausible_bounds(control: Sequence[TileRef], settings: Table2Settings) -> dict:
    """Per metric, the control group's ``outside`` percentiles (NaN ratios left out)."""
    bounds = {}
    for m in METRICS:
        v = np.array([r.metrics[m] for r in control], dtype=np.float64)
        v = v[np.isfinite(v)]
        bounds[m] = tuple(float(b) for b in np.percentile(v, settings.outside)) if v.size \
            else (-math.inf, math.inf)
    return bounds


def breaks_rule(metrics: dict[str, float], bounds: dict) -> list[str]:
    """The metrics of a tile that fall outside the plausible bounds."""
    out = []
    for m in METRICS:
        v, (lo, hi) = metrics[m], bounds[m]
        if np.isfinite(v) and (v < lo or v > hi):
            out.append(m)
    return out


def select(slices: Sequence[SliceData], settings: Table2Settings
           ) -> tuple[list[TileRef], list[TileRef], dict]:
    """(implausible tiles, control tiles, the plausible bounds) over all slices."""
    implausible, control = [], []
    for sl in slices:
        a, b = candidate_tiles(sl, settings)
        implausible += a
        control += b
    bounds = plausible_bounds(control, settings)
    implausible = [r for r in implausible if breaks_rule(r.metrics, bounds)]
    rng = np.random.default_rng(settings.seed)

    def cap(refs: list[TileRef]) -> list[TileRef]:
        if len(refs) <= settings.max_tiles:
            return refs
        keep = np.sort(rng.choice(len(refs), settings.max_tiles, replace=False))
        return [refs[i] for i in keep]

    return cap(implausible), cap(control), bounds


def summarise(values: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and standard error of each metric over tiles (NaN left out per metric)."""
    out = {}
    for m in METRICS:
        v = np.array([d[m] for d in values], dtype=np.float64)
        v = v[np.isfinite(v)]
        mean = float(v.mean()) if v.size else float("nan")
        sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
        out[m] = {"mean": mean, "sem": sem, "n": int(v.size)}
    return out


def degraded_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Dice of the mitochondrion and each inner class inside degraded regions, pooled over tiles:
    ``pairs`` of (prediction, truth, degraded mask)."""
    pred = np.concatenate([p[r] for p, _, r in pairs]) if pairs else np.zeros(0, np.uint8)
    truth = np.concatenate([t[r] for _, t, r in pairs]) if pairs else np.zeros(0, np.uint8)
    out = {}
    for key, c in DICE_KEYS.items():
        out[key] = dice(pred != BACKGROUND, truth != BACKGROUND) if c is None else \
            dice(pred == c, truth == c)
    return out


def whole_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """As :func:`degraded_dice` over whole slices: ``pairs`` of (prediction, truth)."""
    return degraded_dice([(p, t, np.ones(t.shape, bool)) for p, t in pairs])


def closer_to_control(methods: dict) -> dict:
    """Per method and metric: |mean - control mean| (smaller is better)."""
    ctrl = methods["control"]
    return {name: {m: abs(v[m]["mean"] - ctrl[m]["mean"]) for m in METRICS}
            for name, v in methods.items() if name != "control"}


def closer_count(dist: dict, a: str, b: str) -> int:
    """On how many of the five metrics ``a`` is strictly closer to the control than ``b``."""
    return sum(dist[a][m] < dist[b][m] for m in METRICS)


def verdict(methods: dict, dice_deg: dict, method: str = DEFAULT_METHOD) -> dict:
    """The targets, measured for ``method`` (the default): on how many of the five metrics it is
    closer to control than the initial labels and than each other method; whether its degraded
    Dice is best for mitochondrion and cristae. With a ``truth`` row, ``truth_closer_than``
    says the same of the ground truth: what the target asks of a perfect refinement (a method
    that sits on the control where the truth does not cannot be beaten there)."""
    dist = closer_to_control(methods)
    out: dict = {"distance_to_control": dist}
    if "truth" in dist:
        out["truth_closer_than"] = {other: closer_count(dist, "truth", other)
                                    for other in ("initial", *REFINERS) if other in dist}
    if method not in dist:
        return out
    for other in ("initial", *REFINERS):
        if other != method and other in dist:
            out[f"{method}_closer_than_{other}"] = closer_count(dist, method, other)
    if method in dice_deg:
        for key in ("mitochondrion", "cristae"):
            best = max(v[key] for v in dice_deg.values())
            out[f"{method}_best_dice_{key}"] = bool(dice_deg[method][key] >= best)
    return out


def to_markdown(result: dict) -> str:
    methods, dd = result["methods"], result["dice_degraded"]
    default = result.get("default_method")
    names = {"skeleton_end_points": "skeleton end points", "skeleton_cycles": "skeleton cycles",
             "boundary_area_ratio": "boundary/area %",
             "cristae_boundary_ratio": "cristae boundary ratio %",
             "inner_membrane_background_ratio": "inner-membrane/background ratio %"}
    lines = [f"Warning: {w}" for w in result.get("warnings", [])]
    lines += [""] if lines else []
    lines += ["| method | " + " | ".join(names[m] for m in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for name in METHODS:
        if name not in methods:
            continue
        row = methods[name]
        lines.append(f"| {_row_name(name, default)} | " + " | ".join(
            f"{row[m]['mean']:.2f} ± {row[m]['sem']:.2f}" for m in METRICS) + " |")
    lines += ["", "Paper (real data, for orientation):", "",
              "| method | " + " | ".join(names[m] for m in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for name, vals in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines += ["", "Dice inside degraded regions (implausible tiles, against ground truth):", "",
              "| method | " + " | ".join(DICE_KEYS) + " |", "|---|" + "---|" * len(DICE_KEYS)]
    for name in METHODS:
        if name in dd:
            lines.append(f"| {_row_name(name, default)} | "
                         + " | ".join(f"{dd[name][k]:.3f}" for k in DICE_KEYS) + " |")
    whole = result.get("dice_whole", {})
    if whole:
        lines += ["", "Dice over the whole evaluated slices (every method run on the whole slice, "
                  "against ground truth):", "",
                  "| method | " + " | ".join(DICE_KEYS) + " | mean |",
                  "|---|" + "---|" * (len(DICE_KEYS) + 1)]
        for name in METHODS:
            if name in whole:
                d = whole[name]
                lines.append(f"| {_row_name(name, default)} | "
                             + " | ".join(f"{d[k]:.3f}" for k in DICE_KEYS)
                             + f" | {np.mean([d[k] for k in DICE_KEYS]):.3f} |")
    return "\n".join(lines) + "\n"


def _row_name(name: str, default: str | None) -> str:
    if name == "truth":
        return "ground truth (same tiles)"
    return f"{name} (default)" if name == default else name


def strict(value):
    """``value`` with every non-finite float (a mean over nothing) as None: table2.json is
    strict JSON, which every reader parses (``NaN`` is not JSON)."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write(result: dict, out: str | os.PathLike) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table2.json").write_text(json.dumps(strict(result), indent=2, default=float,
                                                allow_nan=False) + "\n")
    (out / "table2.md").write_text(to_markdown(result))


# ---------------------------------------------------------------- the experiment on stores


def load_slices(location: str | os.PathLike, settings: Table2Settings, ensemble=None,
                segment_settings=None) -> list[SliceData]:
    """Every ``every``-th z-slice of a segmented held-out phantom. With ``ensemble``, each slice's
    ensemble probabilities are computed on demand (and kept) for the CRF."""
    vol = open_image(location)
    root = open_group(location, mode="r")
    names = label_names(root)
    need = (INITIAL, GROUND_TRUTH, DEGRADED)
    missing = [n for n in need if n not in names]
    if missing:
        raise VolrefError(f"{location}: no label image {', '.join(missing)} (Table 2 needs a "
                          "phantom made by volref synth and segmented by volref segment)")
    try:
        unc_arr = finest(root, UNCERTAINTY_PATH)
    except KeyError:
        raise VolrefError(f"{location}: no {UNCERTAINTY_PATH}: run volref segment first") from None
    initial, truth, degraded = (finest(root, label_path(n)) for n in need)
    seg = segment_settings or SegmentSettings()
    made_with = Manifest(root[META], "segment").settings()
    irange = (IntensityRange(**made_with["intensity"]) if "intensity" in made_with
              else volume_intensity(vol, None, seg)[0])  # as volref segment normalised it
    nz = vol.shape[0]
    out = []
    for z in range(settings.every // 2, nz, settings.every):
        zs = reflect(np.arange(z - 1, z + 2), nz)  # mirrored at the ends, as segment reads
        stack = normalise(np.asarray(vol.data[zs].compute()), irange)
        probs_cache: dict = {}

        def probabilities(stack=stack, cache=probs_cache) -> np.ndarray:
            if "p" not in cache:
                h = seg.halo
                ny, nx = stack.shape[1:]
                padded = read_padded(stack, (0, -h, -h), (3, ny + h, nx + h), "mirror")
                cache["p"] = segment_probabilities(ensemble, padded, seg)[0]
            return cache["p"]

        out.append(SliceData(
            source=str(location), z=z, image=stack[1],
            initial=initial[z],
            uncertainty=unc_arr[z].astype(np.float32) / np.float32(255.0),
            truth=truth[z],
            degraded=degraded[z].astype(bool),
            probabilities=probabilities if ensemble is not None else None))
    return out


def evaluate_table2(stores: Sequence[str | os.PathLike], models: dict, ensemble,
                    methods: Sequence[str] = REFINERS,
                    settings: Table2Settings = Table2Settings(), method_settings=None,
                    progress: Callable[[str, int, int], None] | None = None,
                    n_examples: int = 6, whole: bool = True) -> tuple[dict, list[dict]]:
    """Table 2 on ``stores``: select tiles, refine the implausible ones by every method, measure.

    ``models``: method name -> tile refiner (``mae``, ``mae-x``, ``cnn-ae``); ``ensemble``: the
    segmenter whose probabilities the CRF refines (needed only for ``crf``). Returns the result
    (JSON-ready) and ``n_examples`` implausible tiles for a figure (image, initial, removed
    pixels, truth and every method's labels). ``whole``: also run every method on every
    evaluated slice whole for ``dice_whole`` (False: the tiles alone, faster; no
    ``dice_whole``)."""
    ms = method_settings or MethodSettings()
    slices = [s for store in stores for s in load_slices(store, settings, ensemble)]
    implausible, control, bounds = select(slices, settings)
    t = settings.tile
    results: dict[str, list] = {"initial": []}
    pairs: dict[str, list] = {"initial": []}
    removed = []
    for ref in implausible:
        truth, region = ref.cut(ref.slice.truth, t), ref.cut(ref.slice.degraded, t)
        results["initial"].append(ref.metrics)
        pairs["initial"].append((ref.cut(ref.slice.initial, t), truth, region))
        rm = removal_mask(ref.cut(ref.slice.initial, t), ref.cut(ref.slice.uncertainty, t), 4,
                          ms.refine.tau, ms.refine.near_px)
        removed.append(np.kron(rm, np.ones((4, 4), bool)))
    shown = example_tiles(removed, n_examples)
    examples = [{"where": f"{implausible[i].slice.source.rstrip('/').split('/')[-1]} "
                          f"z {implausible[i].slice.z} y {implausible[i].y} x {implausible[i].x}",
                 "image": implausible[i].cut(implausible[i].slice.image, t),
                 "initial": pairs["initial"][i][0], "removed": removed[i],
                 "truth": pairs["initial"][i][1], "labels": {}} for i in shown]
    for method in methods:
        results[method], pairs[method] = [], []
        for i, ref in enumerate(implausible):
            sl = ref.slice
            lab = refine_tile(method, models, initial=sl.initial, uncertainty=sl.uncertainty,
                              image=sl.image, probabilities=sl.probabilities, y=ref.y,
                              x=ref.x, tile=t, settings=ms)
            results[method].append(tile_metrics(lab))
            pairs[method].append((lab, ref.cut(sl.truth, t), ref.cut(sl.degraded, t)))
            if i in shown:
                examples[shown.index(i)]["labels"][method] = lab
            if progress:
                progress(method, i + 1, len(implausible))
    dice_all = {"initial": whole_dice([(sl.initial, sl.truth) for sl in slices])}
    for method in methods if whole else ():
        labels = []
        for j, sl in enumerate(slices):
            labels.append(refine_slice(method, models, initial=sl.initial,
                                       uncertainty=sl.uncertainty, image=sl.image,
                                       probabilities=sl.probabilities, tile=t, settings=ms))
            if progress:
                progress(f"{method} (whole slices)", j + 1, len(slices))
        dice_all[method] = whole_dice([(lab, sl.truth) for lab, sl in zip(labels, slices)])
    table = {name: summarise(v) for name, v in results.items()}
    table["control"] = summarise([r.metrics for r in control])
    table["truth"] = summarise([tile_metrics(ref.cut(ref.slice.truth, t)) for ref in implausible])
    dice_deg = {name: degraded_dice(p) for name, p in pairs.items()}
    methods_out = {name: table[name] for name in METHODS if name in table}
    return {
        "default_method": DEFAULT_METHOD,
        "methods": methods_out,
        "dice_degraded": {name: dice_deg[name] for name in METHODS if name in dice_deg},
        **({"dice_whole": {name: dice_all[name] for name in METHODS if name in dice_all}}
           if whole else {}),
        "tiles": {"implausible": len(implausible), "control": len(control),
                  "slices": len(slices), "stores": [str(s) for s in stores]},
        "plausible_bounds": {m: list(b) for m, b in bounds.items()},
        "warnings": control_warnings(len(control)),
        "implausible_tiles": [{"store": r.slice.source, "z": r.slice.z, "y": r.y, "x": r.x,
                               "breaks": breaks_rule(r.metrics, bounds)} for r in implausible],
        "settings": settings.to_dict(),
        "verdict": verdict(methods_out, dice_deg),
    }, examples


def control_warnings(n: int) -> list[str]:
    """Why the control row may not be trusted: too few plausible tiles to bound a plausible
    range (e.g. phantoms with a low-SNR spot along every mitochondrion)."""
    if n >= MIN_CONTROL:
        return []
    return [f"the control group has {n} tile{'' if n == 1 else 's'} (fewer than {MIN_CONTROL}): "
            "its range of plausible values is not measured; add stores with plausible tiles "
            "(e.g. a phantom without spots: volref synth --degraded-fraction 0, then volref "
            "segment)"]


def example_tiles(removed: Sequence[np.ndarray], n: int,
                  share: tuple[float, float] = (0.05, 0.5)) -> list[int]:
    """Indices of ``n`` tiles to show: the most removed pixels among tiles whose removed share
    lies in ``share`` (something to rebuild, and something to rebuild it from)."""
    frac = np.array([r.mean() for r in removed]) if removed else np.zeros(0)
    ok = np.flatnonzero((frac >= share[0]) & (frac <= share[1]))
    order = ok[np.argsort(-frac[ok], kind="stable")]
    return [int(i) for i in order[:n]]
