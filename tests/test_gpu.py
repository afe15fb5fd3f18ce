"""Inference of every shipped model on a CUDA device agrees with the CPU, and training runs there
(skipped without one).

Each inference test runs the model through the same stage function the pipeline uses, once on
``cpu`` and once on ``cuda``, in fp32 so that the two differ only by kernel rounding. The training
tests train tiny models on ``cuda`` (as ``volref train --device cuda`` does), then load the files
on the CPU; ``python -m benchmarks.gpu_check`` runs them all.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.helpers import TINY_MAE, TINY_UNET, gpu_test, ground_truth_pool
from volref.models.checkpoint import load_tensors
from volref.models.registry import load_refiner, load_segmenter
from volref.stages.refine import RefineSettings, context, refine_region
from volref.stages.segment import SegmentSettings, segment_slices


def _stack(seed: int = 0) -> np.ndarray:
    """Normalised intensities ``(3, 288, 288)``: one slice with 32 px of halo and z context."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:288, :288]
    blobs = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 20.0 ** 2))
                for cy, cx in rng.integers(40, 248, (6, 2)))
    image = (blobs - blobs.mean()) / blobs.std() + 0.3 * rng.standard_normal((288, 288))
    return np.repeat(image[None], 3, axis=0).astype(np.float32)


@gpu_test
def test_segmenter_on_cuda_agrees_with_cpu() -> None:
    settings = SegmentSettings(precision="fp32")
    stack = _stack()
    out = {dev: segment_slices(load_segmenter(device=dev), stack, settings, device=dev)
           for dev in ("cpu", "cuda")}
    (lab_cpu, unc_cpu), (lab_gpu, unc_gpu) = out["cpu"], out["cuda"]
    assert lab_gpu.shape == (1, 224, 224) and lab_gpu.dtype == np.uint8
    assert (lab_cpu == lab_gpu).mean() > 0.999
    np.testing.assert_allclose(unc_gpu, unc_cpu, atol=1e-3)


@gpu_test
@pytest.mark.parametrize("method", ["mae", "mae-x", "cnn-ae"])
def test_refiner_on_cuda_agrees_with_cpu(method: str) -> None:
    settings = dataclasses.replace(RefineSettings(), precision="fp32")
    segmenter = load_segmenter()
    stack = _stack(1)
    labels, uncertainty = segment_slices(segmenter, stack, SegmentSettings(precision="fp32"))
    c = context(settings, 4)
    pad = ((0, 0), (c, c), (c, c))
    lab = np.pad(labels, pad)
    unc = np.pad(uncertainty, pad)
    image = np.pad(stack[1:2, 32:-32, 32:-32], pad, mode="reflect")
    out = {}
    for dev in ("cpu", "cuda"):
        model = load_refiner(method=method, device=dev)
        out[dev] = refine_region(model, lab, unc, settings, device=dev, image=image)
    assert out["cuda"].tiles_run == out["cpu"].tiles_run > 0
    np.testing.assert_array_equal(out["cuda"].removed, out["cpu"].removed)
    assert (out["cuda"].labels == out["cpu"].labels).mean() > 0.999


# ---------------------------------------------------------------- training on CUDA


@gpu_test
def test_segmenter_trains_on_cuda_and_its_file_runs_on_cpu(small_phantom, tmp_path):
    """A tiny ensemble trained on ``cuda`` (bf16 autocast) lowers its loss; its file loads on the
    CPU and segments as it does on the GPU."""
    from volref.train.data import load_volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    recipe = SegmenterRecipe(members=2, epochs=3, steps_per_epoch=12, batch=8, crop=64,
                             unet=TINY_UNET, lr=1e-2, bf16=True)
    path = train_segmenter([load_volume(small_phantom)], recipe, tmp_path / "seg",
                           device="cuda")
    card = json.loads(path.with_suffix(".json").read_text())["card"]
    assert card["device"].startswith("cuda:0 (")
    for losses in card["loss_per_epoch"].values():
        assert losses[-1] < losses[0], losses
    settings = SegmentSettings(precision="fp32")
    stack = _stack(2)
    (lab_cpu, unc_cpu), (lab_gpu, unc_gpu) = (
        segment_slices(load_segmenter(path, device=dev), stack, settings, device=dev)
        for dev in ("cpu", "cuda"))
    assert (lab_cpu == lab_gpu).mean() > 0.999
    np.testing.assert_allclose(unc_gpu, unc_cpu, atol=1e-3)


@gpu_test
@pytest.mark.parametrize("method", ["mae", "cnn-ae"])
def test_refiner_trains_on_cuda_and_its_file_runs_on_cpu(small_phantom, tmp_path, method):
    """A tiny refiner trained on ``cuda`` in bf16 lowers its loss; its file loads on the CPU and
    rebuilds a batch as it does on the GPU."""
    from volref.train.refiner import RefinerRecipe, make_batch, train_refiner

    pool = ground_truth_pool(small_phantom)
    recipe = RefinerRecipe(epochs=4, steps_per_epoch=20, batch=16, crop=32, lr=2e-3,
                           mae=TINY_MAE, method=method)
    path = train_refiner(pool, recipe, tmp_path / method, device="cuda")
    card = json.loads(path.with_suffix(".json").read_text())["card"]
    assert card["device"].startswith("cuda:0 (")
    losses = card["loss_per_epoch"]
    assert losses[-1] < losses[0], losses
    labels, mask, _, offset, _ = make_batch(pool, recipe, np.random.default_rng(5))
    classes = {}
    for dev in ("cpu", "cuda"):
        model = load_refiner(path, method=method, device=dev)
        with torch.no_grad():
            logits = model(labels.to(dev), mask.to(dev), offset)
        classes[dev] = logits.argmax(dim=1).cpu()
    assert (classes["cpu"] == classes["cuda"]).float().mean() > 0.999


@gpu_test
def test_training_resumes_across_devices(small_phantom, tmp_path):
    """Epochs on cuda, then on the CPU, then on cuda again, in one output folder: each run
    resumes from the last one's state (Adam's moments follow the model)."""
    from volref.train.refiner import RefinerRecipe, train_refiner

    pool = ground_truth_pool(small_phantom)
    recipe = RefinerRecipe(epochs=1, steps_per_epoch=4, batch=8, crop=32, mae=TINY_MAE)
    out = tmp_path / "mae"
    losses: list[float] = []
    for epochs, dev in ((1, "cuda"), (2, "cpu"), (3, "cuda")):
        path = train_refiner(pool, dataclasses.replace(recipe, epochs=epochs), out, device=dev)
        card = json.loads(path.with_suffix(".json").read_text())["card"]
        assert card["device"].startswith(dev)
        assert card["loss_per_epoch"][:-1] == losses  # the earlier epochs were not run again
        losses = card["loss_per_epoch"]
    tensors, _ = load_tensors(out / "state.safetensors")
    steps = {k: float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {12.0}  # Adam's step count went on across devices
    # each Adam step moves a weight by about lr at most: runs from the same start stay within
    # 2 x 12 x lr of each other (another start would be ~0.02 away)
    straight = train_refiner(pool, dataclasses.replace(recipe, epochs=3), tmp_path / "cpu")
    a, b = load_refiner(path), load_refiner(straight)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=24 * recipe.lr, msg=k)


@gpu_test
def test_a_gpu_device_is_what_auto_picks():
    from volref.train.device import resolve_device

    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device(f"cuda:{torch.cuda.device_count() - 1}").type == "cuda"
