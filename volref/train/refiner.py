"""Training the MAE refiner on the ensemble's own predictions (METHOD.md).

Per training tile: labels = ensemble argmax, uncertainty = its normalised entropy. A masking ratio
r ~ U[0.1, 0.9] is drawn per batch; the candidates are the 70 % of patches closest to a
mitochondrion (patches far away are never chosen); r of the candidates are removed — scattered
at random as in the paper, or, for ``blob_fraction`` of the tiles, as one contiguous blob. At
inference the removed patches are where the stain was weak: contiguous spots, often most of a
mitochondrion's section in a tile. A MAE trained on scattered patches alone rebuilds such spots
poorly (comb-like stripes where the spot meets the visible part, README figure of the earlier
weights); blobs teach it to continue shapes across a spot. The loss is
class-weighted cross-entropy on removed pixels that are certain (entropy < tau_train = 0.1) and
near a mitochondrion. Tiles are kept when more than 30 % of their pixels are mitochondrion.

CPU budget: the paper's 128x128 tiles cost ~14 GFLOP each; on a CPU volref trains on 64x64 crops
placed at random offsets of the 32x32 position lattice (the same fixed sin-cos embeddings serve
128x128 tiles at inference) with bf16 autocast. The recipe records which was used, the card
the device (``--device``, :mod:`volref.train.device`: on a GPU the paper's 128x128 tiles are
cheap). A background thread makes the next batches meanwhile (:mod:`volref.train.prefetch`):
the same batches, in the same order, with or without it.

The paper's two learned baselines train the same way on the same tiles (``method``): ``mae-x``
(the MAE with an image encoder; it also gets the image crops, and starts from a trained MAE with
``init``) and ``cnn-ae`` (the convolutional denoising autoencoder, whose loss covers every kept
pixel of the tile since it repaints the whole tile).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from scipy import ndimage

from volref import __version__
from volref.classes import BACKGROUND
from volref.errors import VolrefError
from volref.methods import REGISTRY, Method, trainable
from volref.models.checkpoint import save_model
from volref.models.cnnae import CNNAEConfig, CNNAutoencoder
from volref.models.mae import MAEConfig, MaskedAutoencoder
from volref.models.registry import CNNAE_KIND, REFINER_KIND, file_hash, load_refiner
from volref.train.device import autocast, describe, pinned, resolve_device, to_device
from volref.train.prefetch import Prefetch
from volref.train.schedule import Observer, cosine_lr, optimizer_step
from volref.train.state import load_state, save_state

log = logging.getLogger(__name__)

#: the methods this trains (:mod:`volref.methods`: those marked trainable)
METHODS = trainable()
#: the file a training run writes, per method (the names volref ships them under)
MODEL_FILES = {name: str(REGISTRY[name].weights) for name in METHODS}


@dataclass(frozen=True)
class RefinerRecipe:
    epochs: int = 10
    steps_per_epoch: int = 100
    batch: int = 32
    crop: int = 64
    lr: float = 1.5e-4
    weight_decay: float = 1e-5
    mask_ratio: tuple[float, float] = (0.1, 0.9)
    candidate_fraction: float = 0.7
    blob_fraction: float = 0.0  # share of tiles whose removed patches form one blob (see below)
    tau_train: float = 0.1
    near_px: float = 16.0
    min_mito_fraction: float = 0.3
    class_weights: tuple[float, ...] = (0.16, 0.16, 0.36, 0.16)
    bf16: bool = True
    seed: int = 0
    init: str | None = None  # start from this refiner's weights (e.g. a 64x64-crop run)
    method: str = "mae"  # a trainable method: mae, mae-x (needs mae.image_depth > 0), cnn-ae
    mae: MAEConfig = dataclasses.field(default_factory=MAEConfig)
    cnnae: CNNAEConfig = dataclasses.field(default_factory=CNNAEConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.spec.model != "cnn-ae" and (self.spec.model == "mae-x") != \
                (self.mae.image_depth > 0):
            raise ValueError("mae-x is the MAE with an image encoder: image_depth > 0 for "
                             "mae-x and only for it")

    @property
    def spec(self) -> Method:
        """The method trained (its registry entry)."""
        return REGISTRY[self.method]

    def build(self) -> MaskedAutoencoder | CNNAutoencoder:
        return CNNAutoencoder(self.cnnae) if self.spec.model == "cnn-ae" else \
            MaskedAutoencoder(self.mae)

    @property
    def model_config(self) -> MAEConfig | CNNAEConfig:
        return self.cnnae if self.spec.model == "cnn-ae" else self.mae

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mask_ratio"] = list(self.mask_ratio)
        d["class_weights"] = list(self.class_weights)
        return d


@dataclass
class TilePool:
    """Training crops: labels (T, s, s) uint8, uncertainty (T, s, s) float32 and, for MAE+X, the
    normalised image (T, s, s) float32."""

    labels: np.ndarray
    uncertainty: np.ndarray
    image: np.ndarray | None = None


def tile_pool(pairs: list[tuple[np.ndarray, np.ndarray]], crop: int,
              min_mito_fraction: float, images: list[np.ndarray] | None = None) -> TilePool:
    """Crops on a grid of stride ``crop/2`` plus the half-shifted grid, kept when more than
    ``min_mito_fraction`` of the pixels are mitochondrion. ``pairs`` = (labels, uncertainty)
    volumes ``(z, y, x)``; ``images``: their normalised images, cropped alike (MAE+X)."""
    labs, uncs, imgs = [], [], []
    stride = crop // 2
    for v, (labels, unc) in enumerate(pairs):
        nz, ny, nx = labels.shape
        for shift in (0, stride // 2):
            for y0 in range(shift, ny - crop + 1, stride):
                for x0 in range(shift, nx - crop + 1, stride):
                    lab = labels[:, y0:y0 + crop, x0:x0 + crop]
                    frac = (lab != BACKGROUND).mean(axis=(1, 2))
                    keep = np.flatnonzero(frac > min_mito_fraction)
                    labs.append(lab[keep])
                    uncs.append(unc[keep, y0:y0 + crop, x0:x0 + crop])
                    if images is not None:
                        imgs.append(images[v][keep, y0:y0 + crop, x0:x0 + crop])
    if not labs or sum(len(x) for x in labs) == 0:
        raise ValueError("no training tile has enough mitochondrion pixels")
    return TilePool(np.concatenate(labs), np.concatenate(uncs).astype(np.float32),
                    np.concatenate(imgs).astype(np.float32) if images is not None else None)


def patch_distance(labels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel distance to the nearest mitochondrion pixel ``(H, W)`` and its per-patch minimum
    ``(H/p * W/p,)``; infinite where a tile has no mitochondrion."""
    mito = labels != BACKGROUND
    if not mito.any():
        dist = np.full(labels.shape, np.inf, dtype=np.float32)
    else:
        dist = ndimage.distance_transform_edt(~mito).astype(np.float32)
    h, w = labels.shape
    per_patch = dist.reshape(h // patch, patch, w // patch, patch).min(axis=(1, 3)).ravel()
    return dist, per_patch


def blob(candidates: np.ndarray, count: int, grid: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of the ``candidates`` (patch indices of a ``grid x grid`` tile) forming one
    irregular blob: those closest to a random candidate under a random elliptical metric with
    a little noise — removal shaped like a low-SNR spot, not scattered patches."""
    if count == 0:
        return candidates[:0]
    centre = candidates[rng.integers(len(candidates))]
    cy, cx = divmod(int(centre), grid)
    gy, gx = np.divmod(candidates, grid)
    angle = rng.uniform(0, np.pi)
    u = (gy - cy) * np.cos(angle) + (gx - cx) * np.sin(angle)
    v = -(gy - cy) * np.sin(angle) + (gx - cx) * np.cos(angle)
    d = (u / rng.uniform(1, 3)) ** 2 + v ** 2 + rng.normal(0, 1.0, len(candidates))
    return candidates[np.argsort(d, kind="stable")[:count]]


def make_batch(pool: TilePool, recipe: RefinerRecipe, rng: np.random.Generator):
    """Labels, removal masks, loss-keep masks, a lattice offset and (MAE+X) the image crops
    (else None) for one training batch."""
    c = recipe.mae
    n, s = recipe.batch, recipe.crop
    idx = rng.integers(len(pool.labels), size=n)
    ratio = rng.uniform(*recipe.mask_ratio)
    labels = np.empty((n, s, s), dtype=np.uint8)
    keep = np.empty((n, s, s), dtype=bool)
    with_image = recipe.spec.model == "mae-x"
    if with_image and pool.image is None:
        raise VolrefError("mae-x trains on the image too: the tile pool has no image crops")
    image = np.empty((n, s, s), dtype=np.float32) if with_image else None
    g = s // c.patch
    mask = np.zeros((n, g * g), dtype=bool)
    for i, j in enumerate(idx):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        lab = np.rot90(pool.labels[j], k)
        unc = np.rot90(pool.uncertainty[j], k)
        if flip:
            lab, unc = lab[:, ::-1], unc[:, ::-1]
        if image is not None and pool.image is not None:
            img = np.rot90(pool.image[j], k)
            image[i] = img[:, ::-1] if flip else img
        dist, pdist = patch_distance(lab, c.patch)
        order = np.argsort(pdist, kind="stable")
        candidates = order[: int(round(recipe.candidate_fraction * len(order)))]
        count = int(round(ratio * len(candidates)))
        if rng.random() < recipe.blob_fraction:
            chosen = blob(candidates, count, g, rng)
        else:
            chosen = rng.choice(candidates, size=count, replace=False)
        mask[i, chosen] = True
        labels[i] = lab
        keep[i] = (unc < recipe.tau_train) & (dist <= recipe.near_px)
    offset = (int(rng.integers(c.grid - g + 1)), int(rng.integers(c.grid - g + 1)))
    return (torch.from_numpy(labels), torch.from_numpy(mask), torch.from_numpy(keep), offset,
            torch.from_numpy(image) if with_image else None)


def train_refiner(pool: TilePool, recipe: RefinerRecipe, out: str | os.PathLike,
                  observer: Observer | None = None, data_names: list[str] | None = None,
                  command: str | None = None, segmentation: dict[str, Any] | None = None,
                  device: str | torch.device | None = "cpu", prefetch: int = 2) -> Path:
    """Train (or resume) a tile refiner (``recipe.method``); writes ``OUT/<MODEL_FILES[method]>``
    with its model card (``segmentation``: which segmentation of the data it learnt from, when not
    the ensemble's). ``device``: where to train (``auto``: a GPU when torch sees one; ``volref
    train refiner`` defaults to it); ``prefetch``: batches made ahead by a background thread (0:
    in the loop; the result is the same)."""
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = recipe.build().to(dev)  # initial weights drawn on the CPU, then moved
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                            betas=(0.9, 0.95))
    state_path = out / "state.safetensors"
    info: dict[str, Any] = {"epoch": 0, "losses": [], "seconds": 0.0}
    init_sha256 = file_hash(recipe.init) if recipe.init is not None else None
    if state_path.exists():
        info = load_state(state_path, model, opt, rng)
        log.info("refiner: resuming after epoch %d", info["epoch"])
    elif recipe.init is not None:
        start_from = load_refiner(recipe.init)
        want = recipe.model_config
        if recipe.spec.model == "mae-x":  # MAE+X starts from a plain MAE (or from a MAE+X)
            ok = start_from.config in (want, dataclasses.replace(cast(MAEConfig, want),
                                                                 image_depth=0))
        else:
            ok = start_from.config == want
        if not ok:
            raise VolrefError(f"{recipe.init}: its config {start_from.config.to_dict()} does not "
                              f"fit the recipe's {want.to_dict()}")
        missing, _ = model.load_state_dict(start_from.state_dict(), strict=False)
        if any(not k.startswith("image_") for k in missing):
            raise VolrefError(f"{recipe.init}: weights missing for {missing[:3]}")
        log.info("refiner: starting from %s", recipe.init)
    weights = torch.tensor(recipe.class_weights, dtype=torch.float32, device=dev)
    total = recipe.epochs * recipe.steps_per_epoch
    step = info["epoch"] * recipe.steps_per_epoch

    def draw() -> list[Any]:  # in the prefetch thread: rng is its alone meanwhile
        return pinned(make_batch(pool, recipe, rng), dev)

    for epoch in range(info["epoch"], recipe.epochs):
        model.train()
        running, start = 0.0, time.perf_counter()
        with Prefetch(draw, recipe.steps_per_epoch, prefetch) as batches:
            for batch in batches:
                for grp in opt.param_groups:
                    grp["lr"] = cosine_lr(recipe.lr, step, total, floor=0.05)
                labels, mask, keep, offset, image = to_device(batch, dev)
                extra = {} if image is None else {"image": image}
                with autocast(dev, recipe.bf16):
                    logits = model(labels, mask, offset, **extra)
                loss = model.forward_loss(logits, labels, mask, keep, weights)
                value = optimizer_step(opt, loss)
                running += value
                step += 1
                if observer:
                    observer({"epoch": epoch + 1, "epochs": recipe.epochs, "step": step,
                              "steps": total, "loss": value})
        info["losses"].append(running / recipe.steps_per_epoch)
        info["epoch"] = epoch + 1
        info["seconds"] += time.perf_counter() - start
        save_state(state_path, model, opt, rng, info)
        log.info("refiner epoch %d: loss %.4f (%.0f s)", epoch + 1, info["losses"][-1],
                 time.perf_counter() - start)
    card = {"volref": __version__, "method": recipe.method, "recipe": recipe.to_dict(),
            "seed": recipe.seed,
            "init_sha256": init_sha256,
            "data": data_names or [], "training_tiles": int(len(pool.labels)),
            "device": describe(dev),
            **({"labels": segmentation} if segmentation is not None else {}),
            "command": command, "loss_per_epoch": info["losses"],
            "train_seconds": info["seconds"]}
    kind = CNNAE_KIND if recipe.spec.model == "cnn-ae" else REFINER_KIND
    return save_model(out / MODEL_FILES[recipe.method], model.cpu().eval(), kind,
                      recipe.model_config.to_dict(), card)

