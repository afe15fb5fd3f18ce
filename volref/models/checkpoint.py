"""Checkpoints: safetensors for tensors, JSON for everything else. Nothing loads through pickle.

A model file ``NAME.safetensors`` is self-describing: its header metadata holds ``kind`` (which
architecture), ``config`` (the dataclass as JSON) and ``card`` (how it was made). A readable copy
of config and card sits beside it as ``NAME.json``. Loading checks the kind and the number of
classes before building the model, and refuses pickle files (``torch.save`` output, ``.pt``,
``.pth``) by their first bytes without unpickling anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from volref.errors import VolrefError
from volref.files import UserFileError, check_regular_file, read_head


class CheckpointError(VolrefError, ValueError):
    """A checkpoint that is missing, truncated, of another architecture, or not safetensors."""


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; zip (torch.save since 1.6)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 meta: dict[str, Any]) -> Path:
    """Write tensors + JSON-able metadata atomically (write to a temporary name, then rename),
    from CPU copies of the tensors, with the metadata's keys in sorted order: the same tensors
    and metadata give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(flat, metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.write_bytes(_sorted_metadata(data))
    os.replace(tmp, path)
    return path


def _sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its header's ``__metadata__`` keys sorted. safetensors
    writes them in a hash map's order, which changes from one write to the next (6 orders of 3
    keys in 30 writes of one process, safetensors 0.8)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensors' data stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and the
    header's ``{``; that length may well begin with the byte 0x80 that also opens a pickle."""
    return (len(head) == 9 and head[8:9] == b"{"
            and 8 + int.from_bytes(head[:8], "little") <= size)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file and its metadata; refuse anything else with a clear message."""
    try:
        path = check_regular_file(path, "checkpoint")
        head = read_head(path, 9)
    except UserFileError as exc:
        raise CheckpointError(str(exc)) from None
    if not _looks_like_safetensors(head, path.stat().st_size) and any(
            head.startswith(m) for m in _PICKLE_MAGIC):
        raise CheckpointError(
            f"{path} is a pickle/torch.save file; volref loads only safetensors checkpoints "
            "(pickle can run arbitrary code, so it is refused without loading)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              "is it truncated?") from exc
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not JSON ({exc})") from exc
    check_finite_weights(tensors, path)
    return tensors, meta


def check_finite_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinities: such a model labels everything background (or
    anything at all) without an error, so it must not get as far as a block."""
    bad = [name for name, t in tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: weights hold NaN or infinite values ({', '.join(bad[:3])}"
                              f"{more}); the checkpoint is damaged or its training diverged")


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a safetensors file, its tensors left unread."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        return {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: cannot read its metadata ({exc})") from exc


def save_model(path: str | os.PathLike, model: nn.Module, kind: str, config: dict[str, Any],
               card: dict[str, Any] | None = None) -> Path:
    """Save a model's state as ``path`` (safetensors) and ``path`` with ``.json`` (readable)."""
    path = Path(path)
    meta = {"kind": kind, "config": config, "card": card or {}}
    save_tensors(path, model.state_dict(), meta)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_state(path: str | os.PathLike, kind: str | tuple[str, ...],
               n_classes: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and metadata of a model file, after checking its kind (one of ``kind``) and
    classes."""
    tensors, meta = load_tensors(path)
    found = meta.get("kind")
    kinds = (kind,) if isinstance(kind, str) else kind
    if found not in kinds:
        raise CheckpointError(f"{path} holds a {found or 'unknown'} model, expected "
                              f"{' or '.join(kinds)}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: no model config in its metadata")
    if n_classes is not None and config.get("n_classes") != n_classes:
        raise CheckpointError(f"{path} predicts {config.get('n_classes')} classes, "
                              f"expected {n_classes}")
    return tensors, meta


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load a state dict strictly; a mismatch is a wrong architecture, not a crash."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not fit the architecture of its config ({first})") from exc
