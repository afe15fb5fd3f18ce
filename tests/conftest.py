"""Shared fixtures: small phantoms and tiny models made once per session, a reference engine run,
inputs a user should not give, GPU skipping. Plain helpers (configs, comparisons) are in
``tests/helpers.py``."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import zarr

from tests.helpers import (
    CLUSTER_PHANTOM,
    INLINE,
    OUTPUTS,
    SMALL,
    TINY_MAE,
    TINY_UNET,
    cli_tiny,
    tiny,
    write_image,
)
from volref.models.checkpoint import save_model
from volref.models.mae import MaskedAutoencoder
from volref.models.registry import REFINER_KIND, save_segmenter
from volref.models.unet import UNet
from volref.pipeline import write_phantom
from volref.pipeline.run import run


@pytest.fixture(autouse=True)
def _no_leftover_dask_client():
    """Close any distributed client a test left as the default (a command run in-process and
    stopped by a per-case time limit can leave one behind): later plain ``dask.compute`` calls
    would otherwise wait forever on its dead cluster."""
    yield
    from distributed.client import _global_clients

    for client in list(_global_clients.values()):
        client.close()


def pytest_collection_modifyitems(config, items):
    # the marker, not a keyword: a checkout in a folder named "gpu" makes every test's keywords
    # hold "gpu"
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
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


# ---------------------------------------------------------------- engine runs with tiny models


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    seg = save_segmenter(d / "seg.safetensors", [UNet(TINY_UNET).eval() for _ in range(3)])
    mae = save_model(d / "mae.safetensors", MaskedAutoencoder(TINY_MAE).eval(), REFINER_KIND,
                     TINY_MAE.to_dict())
    return str(seg), str(mae)


@pytest.fixture(scope="session")
def reference(small_phantom, models, tmp_path_factory):
    """One uninterrupted in-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    result = run(small_phantom, output=out, settings=tiny(models), cluster=INLINE)
    root = zarr.open_group(out, mode="r")
    return out, result, {k: root[k][:] for k in OUTPUTS}


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
