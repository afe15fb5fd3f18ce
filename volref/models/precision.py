"""The numbers a model computes in at inference: bf16 or fp32 weights and activations, and
``auto``: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere.

bf16 is 2-4x faster than fp32 on GPUs and on CPUs with AVX-512 BF16 or AMX, but a CPU without
them emulates it: there fp32 is 2.2x (ensemble) to 2.9x (MAE) faster (BENCHMARKS.md, "Precision
by hardware"). The two give slightly different probabilities, so a run resolves ``auto`` once,
for all its workers (:func:`volref.pipeline.run.run`), and records the precision it used."""

from __future__ import annotations

import copy
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from volref.settings import AUTO, PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # PRECISIONS but auto

_CAST: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
T = TypeVar("T")
R = TypeVar("R")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a GPU, or a CPU with AVX-512
    BF16 or AMX (as torch reports its capabilities; False where it cannot tell)."""
    if torch.device(device).type != "cpu":
        return True
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    try:
        caps = capabilities()
    except Exception:  # noqa: BLE001 - a capability probe must never fail a run
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve(precision: str, device: str | torch.device = "cpu") -> str:
    """``precision`` itself, or for ``auto`` the one ``device`` computes fastest."""
    check_precision(precision)
    if precision != AUTO:
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def in_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model with weights in ``precision`` (``auto`` resolved for the model's device):
    itself, or a copy made once per model (the caller's model is never cast in place).

    bf16 weights rather than autocast: autocast re-casts every weight on every call, and on the
    CPU does not reach the ensemble's vmapped convolutions at all."""
    param = next(model.parameters())
    dtype = DTYPES[resolve(precision, param.device)]
    if param.dtype == dtype:
        return model
    cast = _CAST.get(model)
    if cast is None or next(cast.parameters()).dtype != dtype:
        cast = _CAST[model] = copy.deepcopy(model).to(dtype).eval()
    return cast


def lanes_for(device: str | torch.device) -> int:
    """How many model passes :func:`in_order` runs side by side: this process's torch threads
    on the CPU (each pass on one thread), one on a GPU."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def in_order(fn: Callable[[T], R], items: list[T], lanes: int) -> Iterator[R]:
    """``fn`` of each item, yielded in order; with ``lanes`` > 1 computed ``lanes`` at a time in
    threads, each running its tensor operations on one core.

    Each item is computed alone on one thread whatever ``lanes`` is, so results are the same bit
    for bit in this process and in a single-threaded worker process: fp32 matrix products on
    several threads split their sums differently (a voxel or two flip at near-ties). On the CPU
    one small pass also keeps several cores busy worse than passes side by side (two threads on
    one MAE tile: 1.5x one thread; two tiles side by side: 1.9x). ``fn`` runs in other threads:
    grad mode is per thread, so it sets its own (``torch.no_grad`` as a decorator)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if lanes <= 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(lanes, thread_name_prefix="volref-pass") as pool:
            pending: deque[Future[R]] = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(threads)
