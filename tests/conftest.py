"""Shared fixtures: small phantoms and tiny models made once per session, a reference engine run,
inputs a user should not give, tree checksums, GPU skipping."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr

from volref.engine.cluster import ClusterSpec
from volref.models.checkpoint import save_model
from volref.models.mae import MAEConfig, MaskedAutoencoder
from volref.models.registry import REFINER_KIND, save_segmenter
from volref.models.unet import UNet, UNetConfig
from volref.pipeline import write_phantom
from volref.pipeline.run import RunSettings, run
from volref.stages.refine import RefineSettings
from volref.stages.segment import SegmentSettings
from volref.synth import SynthConfig

#: tiny model configurations for fast CPU tests
TINY_MAE = MAEConfig(tile=32, width=32, depth=2, heads=2, decoder_width=16, decoder_depth=1,
                     decoder_heads=2)
TINY_UNET = UNetConfig(base=4, levels=2)

#: small, dense phantom: several mitochondria, half of them degraded, chunks that split them
SMALL = SynthConfig(shape=(40, 192, 256), seed=7, chunks=(20, 64, 128), density=8.0,
                    degraded_fraction=0.5)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """A written NGFF 0.5 phantom (read-only use: tests must not modify it)."""
    path = tmp_path_factory.mktemp("phantom") / "small.ome.zarr"
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(SMALL, path))
    return path


@pytest.fixture()
def phantom_copy(small_phantom, tmp_path) -> Path:
    """A private copy of the small phantom that a test may write into."""
    import shutil

    dst = tmp_path / "copy.ome.zarr"
    shutil.copytree(small_phantom, dst)
    return dst


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file below ``path`` (relative path -> digest)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            f = Path(root) / name
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- engine runs with tiny models

OUTPUTS = ("labels/volref-initial/s0", "volref/uncertainty/s0", "labels/volref-refined/s0",
           "labels/volref-mitochondria/s0")
INLINE = ClusterSpec(workers=0)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    seg = save_segmenter(d / "seg.safetensors", [UNet(TINY_UNET).eval() for _ in range(3)])
    mae = save_model(d / "mae.safetensors", MaskedAutoencoder(TINY_MAE).eval(), REFINER_KIND,
                     TINY_MAE.to_dict())
    return str(seg), str(mae)


def tiny(models, **kw) -> RunSettings:
    seg, mae = models
    return RunSettings(segmenter=seg, refiner=mae, segment=SegmentSettings(tile=64, halo=16),
                       refine=RefineSettings(tile=32, stride=16, tau=0.3), **kw)


@pytest.fixture(scope="session")
def reference(small_phantom, models, tmp_path_factory):
    """One uninterrupted in-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    result = run(small_phantom, output=out, settings=tiny(models), cluster=INLINE)
    root = zarr.open_group(out, mode="r")
    return out, result, {k: root[k][:] for k in OUTPUTS}


#: a smaller phantom for runs through the command line on clusters (two blocks deep)
CLUSTER_PHANTOM = SynthConfig(shape=(20, 128, 128), seed=7, chunks=(10, 64, 64), density=8.0,
                              degraded_fraction=0.5)


def cli_tiny(models) -> list[str]:
    """The command line's options for the tiny models (segment tiles stay at their default)."""
    seg, mae = models
    return ["--segmenter", seg, "--refiner", mae, "--stride", "16", "--tau", "0.3"]


@pytest.fixture(scope="session")
def cluster_phantom(tmp_path_factory) -> Path:
    """:data:`CLUSTER_PHANTOM`, written (read-only use)."""
    path = tmp_path_factory.mktemp("phantom") / "cluster.ome.zarr"
    with dask.config.set(scheduler="threads"):
        dask.compute(write_phantom(CLUSTER_PHANTOM, path))
    return path


@pytest.fixture(scope="session")
def cli_reference(cluster_phantom, models, tmp_path_factory):
    """``volref run --workers 0`` on :func:`cluster_phantom` with :func:`cli_tiny` (in this
    process): the bytes every cluster run of the same command must reproduce."""
    from volref.cli.main import main

    out = tmp_path_factory.mktemp("cliref") / "ref.zarr"
    assert main(["-q", "run", str(cluster_phantom), "--output", str(out), "--workers", "0",
                 *cli_tiny(models)]) == 0
    root = zarr.open_group(out, mode="r")
    return {k: root[k][:] for k in OUTPUTS}


def assert_same(store: Path, expected: dict[str, np.ndarray]) -> None:
    root = zarr.open_group(store, mode="r")
    for key, want in expected.items():
        np.testing.assert_array_equal(root[key][:], want, err_msg=key)



@pytest.fixture()
def bad_inputs(tmp_path):
    """Inputs a user may point volref at, by name."""
    made = {}
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 8, 8), dtype="uint16")
    made["plain zarr array"] = tmp_path / "plain.zarr"
    write_image(tmp_path / "2d.ome.zarr", np.zeros((16, 16), dtype=np.uint8), "yx")
    made["2-D image"] = tmp_path / "2d.ome.zarr"
    write_image(tmp_path / "5d.ome.zarr", np.zeros((1, 3, 4, 8, 8), dtype=np.uint16), "tczyx")
    made["5-D with channels"] = tmp_path / "5d.ome.zarr"
    write_image(tmp_path / "bool.ome.zarr", np.zeros((4, 8, 8), dtype=bool), "zyx")
    made["bool image"] = tmp_path / "bool.ome.zarr"
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "readme.txt").write_text("not a store")
    made["directory without zarr"] = tmp_path / "notzarr"
    return made




def write_image(path: Path, data: np.ndarray, axes: str) -> None:
    from tests.test_io import write_image as write

    write(path, data, axes)
