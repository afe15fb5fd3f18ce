"""The CNN-AE baseline: a convolutional denoising autoencoder of segmentation tiles (Larrazabal
et al., "Post-DAE", IEEE TMI 2020), trained like the MAE on the same tiles.

It sees the whole tile — the one-hot classes with the removed patches blanked, plus a channel
marking them — squeezes it through a bottleneck without skip connections (a skip would let it
copy its input instead of learning what a plausible tile looks like) and paints the whole tile
again: in refinement it replaces every pixel of the tiles it runs on (``replaces = "tile"``),
as a post-processing autoencoder does, not only the removed patches.

Shapes: ``labels (N, H, W)`` and ``mask (N, L)`` (the MAE's call) -> logits ``(N, C, H, W)``;
H and W multiples of ``2 ** levels``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from volref.models.config import check_fields, check_tiles


@dataclass(frozen=True)
class CNNAEConfig:
    tile: int = 128
    patch: int = 4  # removal works on the MAE's 4x4 patches
    n_classes: int = 4
    width: int = 32  # channels after the first level; doubled per level up to 4x
    levels: int = 4  # 128 -> 8 pixels at the bottleneck
    bottleneck: int = 64  # channels at the bottleneck

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "tile": (8, 1024), "patch": (1, 64), "n_classes": (1, 64), "width": (8, 1024),
        "levels": (1, 8), "bottleneck": (1, 4096)}

    def __post_init__(self) -> None:
        check_fields(self, self.LIMITS)
        check_tiles(self.tile, self.patch, 2**self.levels)
        if self.width % 8:
            raise ValueError(f"width {self.width} must be a multiple of 8 (group norm)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNNAEConfig:
        return cls(**d)

    @property
    def grid(self) -> int:
        return self.tile // self.patch


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(8, cout), nn.GELU())


class CNNAutoencoder(nn.Module):
    needs_image = False
    replaces = "tile"

    def __init__(self, config: CNNAEConfig) -> None:
        super().__init__()
        self.config = c = config
        chans = [min(c.width * 2 ** i, 4 * c.width) for i in range(c.levels)]
        enc: list[nn.Module] = []
        cin = c.n_classes + 1
        for ch in chans:
            enc += [_conv(cin, ch, stride=2), _conv(ch, ch)]
            cin = ch
        enc.append(nn.Conv2d(cin, c.bottleneck, 1))
        self.encoder = nn.Sequential(*enc)
        dec, cin = [], c.bottleneck
        for ch in reversed(chans):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(cin, ch), _conv(ch, ch)]
            cin = ch
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(cin, c.n_classes, 1)

    def inputs(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One-hot classes, zero on removed pixels, plus the removed-pixel channel."""
        n, h, w = labels.shape
        c, p = self.config.n_classes, self.config.patch
        dtype = self.head.weight.dtype
        onehot = F.one_hot(labels.long().clamp(0, c - 1), c).permute(0, 3, 1, 2).to(dtype)
        removed = mask.reshape(n, 1, h // p, w // p).to(dtype)
        removed = removed.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        return torch.cat([onehot * (1 - removed), removed], dim=1)

    def forward(self, labels: torch.Tensor, mask: torch.Tensor,
                offset: tuple[int, int] = (0, 0), pad_to: int | None = None) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` for every pixel (``offset``/``pad_to``: the MAE's call; a
        convolutional model needs neither)."""
        n, h, w = labels.shape
        if h % 2 ** self.config.levels or w % 2 ** self.config.levels:
            raise ValueError(f"tile {h}x{w} is not a multiple of {2 ** self.config.levels}")
        return self.head(self.decoder(self.encoder(self.inputs(labels, mask))))

    def forward_loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     keep: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on every pixel ``keep`` allows (certain, near a mitochondrion): it
        rebuilds the whole tile, so the whole tile is its target."""
        target = torch.where(keep, labels.long(), torch.full_like(labels.long(), -100))
        return F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=-100)
