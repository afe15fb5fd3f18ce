"""Resumable training state: model + optimizer tensors in safetensors, the rest in JSON.

Written after every epoch (atomically), read back by ``--resume``: the run continues from the
next epoch with the same optimizer moments and random streams, as if never interrupted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volref.models.checkpoint import load_tensors, save_tensors


def save_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
               rng: np.random.Generator, info: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value)
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {"info": info, "param_groups": opt["param_groups"],
            "numpy_rng": rng.bit_generator.state}
    save_tensors(path, tensors, meta)


def load_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
               rng: np.random.Generator) -> dict[str, Any]:
    tensors, meta = load_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    rng.bit_generator.state = meta["numpy_rng"]
    return meta["info"]


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
