"""The numbers a model computes in at inference: bf16 or fp32 weights and activations."""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}

_CAST: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def in_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model with weights in ``precision``: itself, or a copy made once per model (the
    caller's model is never cast in place).

    bf16 weights rather than autocast: autocast re-casts every weight on every call, and on the
    CPU does not reach the ensemble's vmapped convolutions at all. CPUs with AVX-512 BF16 (and
    GPUs) multiply bf16 matrices 4x faster than fp32 ones (BENCHMARKS.md)."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    if next(model.parameters()).dtype == dtype:
        return model
    cast = _CAST.get(model)
    if cast is None or next(cast.parameters()).dtype != dtype:
        cast = _CAST[model] = copy.deepcopy(model).to(dtype).eval()
    return cast
