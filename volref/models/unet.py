"""A 2.5-D U-Net: three neighbouring z-slices in, class logits of the middle slice out.

Why 2.5-D and not 3-D: pan-ExM stacks are 2-3x coarser in z, tubes span 16-36 slices, and what
decides a voxel's class (membranes, lamellae) is resolved in x/y; three slices give the z context
that separates a tube's top from its cross-section. A 3-D U-Net of the same width costs about 3x
the FLOPs per voxel (3x3x3 kernels) — on CPU and GPU alike — for context the labels barely need.

Normalisation is BatchNorm (affine at inference), so a pixel's output depends only on its
receptive field, never on the tile it sits in — needed for tile-invariant, deterministic results.

Shapes: ``x: (N, in_slices, H, W)`` with H, W multiples of ``2**levels`` -> ``(N, C, H, W)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from volref.models.config import check_fields


@dataclass(frozen=True)
class UNetConfig:
    in_slices: int = 3
    n_classes: int = 4
    base: int = 12
    levels: int = 3

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "in_slices": (1, 64), "n_classes": (1, 64), "base": (1, 512), "levels": (1, 8)}

    def __post_init__(self) -> None:
        check_fields(self, self.LIMITS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        return cls(**d)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.levels


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base * 2**i for i in range(config.levels + 1)]
        self.down = nn.ModuleList()
        cin = config.in_slices
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_hi, w_lo in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.up.append(nn.ConvTranspose2d(w_lo, w_hi, 2, stride=2))
            self.merge.append(_block(2 * w_hi, w_hi))
        self.head = nn.Conv2d(widths[0], config.n_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))  # (N, w_i, H/2^i, W/2^i)
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)  # (N, C, H, W)
