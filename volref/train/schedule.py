"""What both training loops share: the learning-rate schedule and the observer signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: Receives one event per optimizer step: epoch, epochs, step, steps, loss (and member, members).
Observer = Callable[[dict[str, Any]], None]


def cosine_lr(base: float, step: int, total: int, floor: float = 0.0) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to ``floor * base``."""
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * min(t, 1.0))))


def optimizer_step(opt: Any, loss: Any) -> float:
    """One step of ``opt`` on ``loss`` (gradients cleared first); the loss as a number."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.item())
