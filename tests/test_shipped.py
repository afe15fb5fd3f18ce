"""The weights shipped inside the package: they load, and they segment an unseen phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from volref.methods import REGISTRY
from volref.models.registry import (
    DEFAULT_REFINER,
    DEFAULT_REFINERS,
    DEFAULT_SEGMENTER,
    load_refiner,
    load_segmenter,
    refiner_method,
    runs,
)
from volref.train.data import load_volume, slice_stack

needs_segmenter = pytest.mark.skipif(not DEFAULT_SEGMENTER.exists(), reason="no shipped ensemble")
needs_refiner = pytest.mark.skipif(not DEFAULT_REFINER.exists(), reason="no shipped MAE")


@pytest.mark.parametrize("path", [
    pytest.param(DEFAULT_SEGMENTER, marks=needs_segmenter),
    *(pytest.param(path, marks=pytest.mark.skipif(not path.exists(), reason=f"no shipped {m}"))
      for m, path in DEFAULT_REFINERS.items()),
])
def test_model_cards_say_how_to_reproduce(path):
    card = json.loads(path.with_suffix(".json").read_text())["card"]
    assert "volref" in card["command"] and " train " in card["command"]
    assert isinstance(card["seed"], int) and card["data"]
    if card.get("init_sha256"):  # a second stage names where it started
        assert "--init" in card["command"]


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
    """A phantom like the training ones (same density and size per slice), seed never trained on."""
    import dask

    from volref.pipeline import write_phantom
    from volref.synth import SynthConfig

    cfg = SynthConfig(shape=(32, 512, 512), seed=21, density=1.2, degraded_fraction=0.3)
    path = tmp_path_factory.mktemp("unseen") / "p.ome.zarr"
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(cfg, path))
    return path


@needs_segmenter
def test_shipped_ensemble_segments_an_unseen_phantom(unseen):
    vol = load_volume(unseen)
    ens = load_segmenter()
    assert len(ens.members) == 5
    z = np.arange(6, 30, 8)
    x = torch.from_numpy(np.stack([slice_stack(vol.image, int(k)) for k in z]))
    labels, u = ens.predict(x)
    truth = vol.classes[z]
    clear = ~vol.degraded[z]
    agree = (labels.numpy() == truth)[clear].mean()
    assert agree > 0.9
    assert float(u.numpy()[vol.degraded[z]].mean()) > float(u.numpy()[clear].mean())


@needs_refiner
def test_shipped_refiner_loads():
    mae = load_refiner()
    assert mae.config.tile == 128 and mae.config.depth == 14 and mae.config.width == 128


@pytest.mark.parametrize("method", sorted(DEFAULT_REFINERS))
def test_shipped_baselines_load_as_their_method(method):
    if not DEFAULT_REFINERS[method].exists():
        pytest.skip(f"no shipped {method}")
    model = load_refiner(method=method)
    assert runs(REGISTRY[method], model) and model.config.tile == 128
    if REGISTRY[method].trainable:  # fused runs the MAE's file
        assert refiner_method(model) == method
