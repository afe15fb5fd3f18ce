"""Training the segmentation ensemble: K U-Nets on different subsets, seeds and annotators.

Each member ``k`` trains on all volumes but one (when there are several), from its own seed, on
labels drawn by its own simulated annotator in degraded areas (:mod:`volref.train.data`).
Checkpoints after every epoch (``member-k/state.safetensors``) make an interrupted run resume;
the finished ensemble is one file, ``segmenter.safetensors``, with a JSON model card beside it.
Training runs on ``device`` (:mod:`volref.train.device`; the card records it) while a background
thread draws the next crops (:mod:`volref.train.prefetch`): the same crops, in the same order,
with or without it.

::

    OUT/
      member-0/state.safetensors + state.json    resumable state, after every epoch
      …
      segmenter.safetensors / segmenter.json     the ensemble + model card
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volref import __version__
from volref.models.registry import save_segmenter
from volref.models.unet import UNet, UNetConfig
from volref.stages.normalise import PHANTOM_SCALE
from volref.train.data import IGNORE, IntensityJitter, Volume, sample_crops
from volref.train.device import autocast, describe, pinned, resolve_device, to_device
from volref.train.prefetch import Prefetch
from volref.train.schedule import Observer, cosine_lr, optimizer_step
from volref.train.state import load_state, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterRecipe:
    members: int = 5
    epochs: int = 6
    steps_per_epoch: int = 60
    batch: int = 16
    crop: int = 96
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    class_weights: tuple[float, ...] = (0.5, 1.5, 1.5, 1.0)
    dice_weight: float = 0.5
    bf16: bool = False  # bf16 autocast (on the training device)
    unet: UNetConfig = field(default_factory=UNetConfig)
    # other acquisitions' contrast, noise and slice steps (None: the crops as they are)
    jitter: IntensityJitter | None = field(default_factory=IntensityJitter)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["class_weights"] = list(self.class_weights)
        return d


def train_segmenter(volumes: list[Volume], recipe: SegmenterRecipe, out: str | os.PathLike,
                    observer: Observer | None = None, data_names: list[str] | None = None,
                    command: str | None = None, device: str | torch.device | None = "cpu",
                    prefetch: int = 2) -> Path:
    """Train (or resume) every member, then write the ensemble. Returns its path.

    ``device``: where to train (``auto``: a GPU when torch sees one; ``volref train segmenter``
    defaults to it); ``prefetch``: batches drawn ahead by a background thread (0: in the loop;
    the result is the same).
    """
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    members, history = [], {}
    for k in range(recipe.members):
        subset = volumes if len(volumes) == 1 else [v for i, v in enumerate(volumes)
                                                    if i != k % len(volumes)]
        model, losses = _train_member(k, subset, recipe, out / f"member-{k}", observer, dev,
                                      prefetch)
        members.append(model)
        history[f"member-{k}"] = losses
    card = {
        "volref": __version__,
        "recipe": recipe.to_dict(),
        "data": data_names or [v.name for v in volumes],
        "device": describe(dev),
        "seed": recipe.seed,
        "command": command,
        "loss_per_epoch": history,
        "intensity": PHANTOM_SCALE.to_dict(),  # how load_volume normalised the data
        "architecture": "2.5-D U-Net (3 slices in, middle slice out), BatchNorm, "
                        f"{recipe.unet.levels} poolings, base width {recipe.unet.base}",
    }
    return save_segmenter(out / "segmenter.safetensors", members, card)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
            dice_weight: float) -> torch.Tensor:
    """Class-weighted cross-entropy + soft Dice (thin IMS and cristae need the Dice term)."""
    ce = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    if dice_weight == 0:
        return ce
    valid = (target != IGNORE).unsqueeze(1)
    p = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(target.clamp_max(logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + dice_weight * (1.0 - dice.mean())


def _train_member(k: int, volumes: list[Volume], recipe: SegmenterRecipe, folder: Path,
                  observer: Observer | None, device: torch.device,
                  prefetch: int) -> tuple[UNet, list[float]]:
    folder.mkdir(parents=True, exist_ok=True)
    seed = recipe.seed * 1000 + k
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(recipe.unet).to(device)  # initial weights drawn on the CPU, then moved
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    total = recipe.epochs * recipe.steps_per_epoch
    state_path = folder / "state.safetensors"
    info: dict[str, Any] = {"epoch": 0, "losses": []}
    if state_path.exists():
        info = load_state(state_path, model, opt, rng)
        log.info("member %d: resuming after epoch %d", k, info["epoch"])
    weights = torch.tensor(recipe.class_weights, dtype=torch.float32, device=device)
    step = info["epoch"] * recipe.steps_per_epoch

    def draw() -> list[torch.Tensor]:  # in the prefetch thread: rng is its alone meanwhile
        x, y = sample_crops(volumes, recipe.batch, recipe.crop, rng, recipe.unet.in_slices,
                            jitter=recipe.jitter)
        return pinned([torch.from_numpy(x), torch.from_numpy(y)], device)

    for epoch in range(info["epoch"], recipe.epochs):
        model.train()
        running, start = 0.0, time.perf_counter()
        with Prefetch(draw, recipe.steps_per_epoch, prefetch) as batches:
            for batch in batches:
                for g in opt.param_groups:  # cosine schedule with a short warm-up, by step
                    g["lr"] = cosine_lr(recipe.lr, step, total)
                x, y = to_device(batch, device)
                with autocast(device, recipe.bf16):
                    logits = model(x)
                loss = loss_fn(logits.float(), y.long(), weights, recipe.dice_weight)
                value = optimizer_step(opt, loss)
                running += value
                step += 1
                if observer:
                    observer({"member": k, "members": recipe.members, "epoch": epoch + 1,
                              "epochs": recipe.epochs, "step": step, "steps": total,
                              "loss": value})
        info["losses"].append(running / recipe.steps_per_epoch)
        info["epoch"] = epoch + 1
        save_state(state_path, model, opt, rng, info)
        log.info("member %d epoch %d: loss %.4f (%.0f s)", k, epoch + 1, info["losses"][-1],
                 time.perf_counter() - start)
    return model.cpu().eval(), info["losses"]

