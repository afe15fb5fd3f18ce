"""Inference of every shipped model on a CUDA device agrees with the CPU (skipped without one).

Each test runs the model through the same stage function the pipeline uses, once on ``cpu`` and
once on ``cuda``, in fp32 so that the two differ only by kernel rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.helpers import gpu_test
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
