"""Model files volref ships and loads: the segmentation ensemble and the tile refiners.

``segmenter.safetensors`` holds all K members (``member{k}.<param>``); each refinement method
that runs a tile refiner names its file in the method registry (:mod:`volref.methods`):
``refiner.safetensors`` the MAE, ``mae-x.safetensors`` and ``cnn-ae.safetensors`` the two learned
baselines of the paper (MAE+X, the CNN denoising autoencoder). All are written by ``volref train
…`` and shipped in ``volref/models/weights``; :func:`load_segmenter` and :func:`load_refiner` use
those when no path is given (``load_refiner(method=...)`` picks the method's file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from volref.classes import N_CLASSES
from volref.files import UserFileError, check_regular_file
from volref.methods import REGISTRY, Method
from volref.models.checkpoint import (
    CheckpointError,
    load_into,
    load_metadata,
    load_state,
    save_tensors,
)
from volref.models.cnnae import CNNAEConfig, CNNAutoencoder
from volref.models.ensemble import Ensemble
from volref.models.mae import MAEConfig, MaskedAutoencoder
from volref.models.unet import UNet, UNetConfig

WEIGHTS = Path(__file__).parent / "weights"
DEFAULT_SEGMENTER = WEIGHTS / "segmenter.safetensors"
DEFAULT_REFINER = WEIGHTS / str(REGISTRY["mae"].weights)  # the paper's MAE
SEGMENTER_KIND = "volref-unet-ensemble"
REFINER_KIND = "volref-mae"  # the MAE and MAE+X (its config's image_depth > 0)
CNNAE_KIND = "volref-cnn-ae"
#: the shipped file of each refinement method that runs a tile refiner (``volref refine
#: --method``), as the registry names it
DEFAULT_REFINERS = {m.name: WEIGHTS / m.weights for m in REGISTRY.values() if m.weights}
#: how ``--method fused`` combines the ensemble's and the MAE's probabilities
DEFAULT_FUSION = WEIGHTS / "fusion.json"


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a model file (recorded in provenance; keys per-worker model caches)."""
    h = hashlib.sha256()
    try:
        path = check_regular_file(path, "checkpoint")
    except UserFileError as exc:
        raise CheckpointError(str(exc)) from None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_segmenter(path: str | os.PathLike, members: list[UNet],
                   card: dict[str, Any] | None = None) -> Path:
    tensors = {f"member{k}.{name}": t for k, m in enumerate(members)
               for name, t in m.state_dict().items()}
    config = {**members[0].config.to_dict(), "members": len(members)}
    meta = {"kind": SEGMENTER_KIND, "config": config, "card": card or {}}
    path = save_tensors(path, tensors, meta)
    import json

    Path(path).with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def model_card(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model card of a checkpoint (default: the shipped ensemble), tensors left unread."""
    meta = load_metadata(Path(path) if path is not None else DEFAULT_SEGMENTER)
    card = meta.get("card")
    return card if isinstance(card, dict) else {}


def load_segmenter(path: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> Ensemble:
    """The ensemble in ``path`` (default: the shipped one), in eval mode on ``device``."""
    path = Path(path) if path is not None else DEFAULT_SEGMENTER
    state, meta = load_state(path, SEGMENTER_KIND, n_classes=N_CLASSES)
    config = dict(meta["config"])
    k = config.pop("members", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 64:
        raise CheckpointError(f"{path}: an ensemble has 1 to 64 members, its card says {k!r}")
    try:
        unet_config = UNetConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config does not describe a U-Net ({exc})") from None
    members = []
    for i in range(k):
        prefix = f"member{i}."
        sub = {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
        m = UNet(unet_config)
        load_into(m, sub, path)
        members.append(m)
    try:
        return Ensemble(members, decision_offsets(meta.get("card"))).to(device).eval()
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def decision_offsets(card: Any) -> list[float] | None:
    """The class offsets of an ensemble's decision in its model card (``card["decision"]
    ["offsets"]``), None when it has none (the plain argmax)."""
    decision = card.get("decision") if isinstance(card, dict) else None
    if decision is None:
        return None
    offsets = decision.get("offsets") if isinstance(decision, dict) else None
    if not isinstance(offsets, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in offsets):
        raise ValueError(f"the card's decision needs a list of numbers 'offsets', got "
                         f"{decision!r}")
    return [float(v) for v in offsets]


def load_refiner(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 method: str = "mae") -> MaskedAutoencoder | CNNAutoencoder:
    """The tile refiner in ``path`` (default: the shipped one of ``method``), in eval mode on
    ``device``: a MAE, a MAE+X or a CNN-AE, as the file's kind and config say."""
    if path is None:
        if method not in DEFAULT_REFINERS:
            raise CheckpointError(f"no shipped model for method {method!r}")
        path = DEFAULT_REFINERS[method]
    path = Path(path)
    state, meta = load_state(path, (REFINER_KIND, CNNAE_KIND), n_classes=N_CLASSES)
    cls, config_cls = ((CNNAutoencoder, CNNAEConfig) if meta["kind"] == CNNAE_KIND
                       else (MaskedAutoencoder, MAEConfig))
    try:
        config = config_cls.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config does not describe a {cls.__name__} ({exc})") \
            from None
    model = cls(config)  # type: ignore[arg-type]  # cls and config_cls are chosen together
    load_into(model, state, path)
    return model.to(device).eval()


def runs(spec: Method, model: MaskedAutoencoder | CNNAutoencoder) -> bool:
    """Whether refinement method ``spec`` can run the loaded tile refiner ``model``: a model of
    its kind (a MAE with an image encoder is a ``mae-x``)."""
    return spec.model == model_kind(model)


def model_kind(model: MaskedAutoencoder | CNNAutoencoder) -> str:
    """The kind of a loaded tile refiner, as the method registry names models."""
    if isinstance(model, CNNAutoencoder):
        return "cnn-ae"
    return "mae-x" if model.needs_image else "mae"


def refiner_method(model: MaskedAutoencoder | CNNAutoencoder) -> str:
    """Which trainable refinement method a loaded tile refiner implements (the one whose
    training makes such a model)."""
    found = next((m.name for m in REGISTRY.values() if m.trainable and runs(m, model)), None)
    if found is None:
        raise CheckpointError(f"no refinement method runs a {type(model).__name__}")
    return found
