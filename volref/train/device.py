"""Where a training run computes: the device named by ``--device``, its autocast, and moving
batches onto it.

``auto`` (the default) is the first CUDA device when torch sees one, else the CPU. The model,
its optimizer state and every batch live on that device; checkpoints are written from CPU
copies (:func:`volref.models.checkpoint.save_tensors`), so a file written on a GPU loads on a
CPU and a run resumes on either (the optimizer's state is moved to its parameters' device when
it is loaded). What stays on the CPU whatever the device: drawing the batches (numpy, one
random stream, :mod:`volref.train.prefetch`) and the model's initial weights (drawn from torch's
CPU generator before the model moves), so a seed gives the same start and the same batches
on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from volref.errors import ConfigError

#: what ``--device`` takes, in words (its error messages and help)
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device ``name`` stands for: ``auto`` (or None) is ``cuda:0`` when torch sees a CUDA
    device and ``cpu`` otherwise; ``cuda`` is ``cuda:0``.

    Raises
    ------
    ConfigError
        For a name that is none of :data:`DEVICE_NAMES`, or a CUDA device torch does not see.
    """
    if name is None or str(name).strip().lower() == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = str(name).strip().lower()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {str(name)!r} is not one of {DEVICE_NAMES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device {str(name)!r} is not one of {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {text!r}: torch {torch.__version__} sees no CUDA device "
                          "(use --device cpu or auto)")
    index = 0 if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {text!r}: torch sees {count} CUDA device"
                          f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """``device`` as a model card records it: ``cpu``, or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device``'s own kind (``cpu`` or ``cuda``) when ``bf16``, else
    nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def pinned(tensors: Sequence[torch.Tensor | Any], device: torch.device) -> list[Any]:
    """``tensors`` in page-locked memory when they go to a CUDA device (so that copying them
    there does not wait); anything that is no tensor, and everything for the CPU, unchanged.
    Runs where batches are made (:mod:`volref.train.prefetch`)."""
    if device.type != "cuda":
        return list(tensors)
    return [t.pin_memory() if isinstance(t, torch.Tensor) else t for t in tensors]


def to_device(tensors: Sequence[torch.Tensor | Any], device: torch.device) -> list[Any]:
    """``tensors`` on ``device`` (asynchronous copies from pinned memory on CUDA; no copy on the
    CPU); anything that is no tensor unchanged."""
    cuda = device.type == "cuda"
    return [t.to(device, non_blocking=cuda) if isinstance(t, torch.Tensor) else t
            for t in tensors]
