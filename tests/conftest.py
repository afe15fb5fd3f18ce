"""Shared fixtures: small phantoms written once per session, tree checksums, GPU skipping."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dask
import pytest

from volref.pipeline import write_phantom
from volref.synth import SynthConfig

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
