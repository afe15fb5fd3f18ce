"""K segmentation networks run as one: mean class probabilities -> labels and uncertainty.

On a GPU the members are stacked with ``torch.func.stack_module_state`` and evaluated with
``vmap`` in one batched pass. On the CPU they run one after another, adding their probabilities
into one running mean: vmap turns each convolution into a grouped one, which the CPU runs 3x
slower than the K convolutions in turn (benchmarks.ensemble_throughput). Either way the
probabilities stay on the device, and only the labels and the normalised entropy leave it.

The labels are the argmax of the mean probabilities, or, when the model card holds a
``decision`` (:func:`volref.models.registry.load_segmenter`), of their logarithms plus one offset
per class: the decision fitted for Dice on phantoms with ground truth (``volref train
decision``). A class-weighted loss moves the probabilities' balance away from the one that
scores best; the offsets move it back without retraining. The uncertainty stays the entropy of
the probabilities themselves.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from volref.models.unet import UNet


class Ensemble(nn.Module):
    def __init__(self, members: list[UNet], offsets: list[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self._stacked: tuple[dict, dict] | None = None
        if offsets is not None and (len(offsets) != self.config.n_classes or not all(
                math.isfinite(float(v)) for v in offsets)):
            raise ValueError(f"a decision needs {self.config.n_classes} finite offsets, "
                             f"got {list(offsets)!r}")
        # log-probability offsets of the decision, one per class (None: the plain argmax); a
        # buffer, so it follows the members to their device, not part of the saved state
        self.register_buffer("offsets", None if offsets is None else torch.tensor(
            [float(v) for v in offsets]), persistent=False)

    @property
    def n_classes(self) -> int:
        return self.config.n_classes

    def train(self, mode: bool = True) -> Ensemble:
        self._stacked = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(device) and friends drop the stacked copy
        self._stacked = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def mean_probabilities(self, x: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
        """``x: (N, S, H, W)`` -> mean softmax over members ``(N, C, H, W)`` (float32).
        ``batched``: one vmapped pass of all members (default: on a GPU, not on the CPU)."""
        if len(self.members) == 1:
            return torch.softmax(self.members[0](x).float(), dim=1)
        if batched is None:
            batched = x.device.type != "cpu"
        if not batched:
            total = torch.softmax(self.members[0](x).float(), dim=1)
            for member in self.members[1:]:
                total += torch.softmax(member(x).float(), dim=1)
            return total / len(self.members)
        if self._stacked is None:
            params, buffers = stack_module_state(list(self.members))
            self._stacked = (params, buffers)
            self._base = copy.deepcopy(self.members[0]).to("meta")
        params, buffers = self._stacked

        def one(p, b, inp):
            return functional_call(self._base, (p, b), (inp,))

        logits = torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x)  # (K, N, C, H, W)
        return torch.softmax(logits.float(), dim=2).mean(dim=0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``(N, H, W)`` uint8 and normalised entropy ``(N, H, W)`` in [0, 1]."""
        p = self.mean_probabilities(x)
        return self.decide(p), normalised_entropy(p)

    def plain_argmax(self) -> Ensemble:
        """Leave the decision out: labels are the argmax of the probabilities (for comparison)."""
        self._buffers["offsets"] = None
        return self

    def decide(self, p: torch.Tensor) -> torch.Tensor:
        """Labels ``(N, H, W)`` uint8 of mean probabilities ``(N, C, H, W)``."""
        offsets = self.offsets
        if not isinstance(offsets, torch.Tensor):
            return p.argmax(dim=1).to(torch.uint8)
        scores = torch.log(p.clamp_min(1e-12)) + offsets.to(p.dtype)[None, :, None, None]
        return scores.argmax(dim=1).to(torch.uint8)


def normalised_entropy(p: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy of class probabilities over ``dim``, divided by log(C): in [0, 1]."""
    c = p.shape[dim]
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=dim)
    return (h / math.log(c)).clamp_(0.0, 1.0)
