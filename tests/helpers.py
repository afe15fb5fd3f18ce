"""What tests share besides fixtures: tiny model configs, the small phantom's config, tiny run
settings, output comparison, an image writer, a multi-process Dask cluster, ``gpu_test``,
napari-ome-zarr's reader without napari.

Fixtures live in ``conftest.py``; everything a test module imports comes from here, never from
another test module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from volref.classes import BACKGROUND
from volref.engine.cluster import ClusterSpec
from volref.io import Axis, create_multiscale, open_group, pyramid_geometry, store_pyramid
from volref.models.mae import MAEConfig
from volref.models.unet import UNetConfig
from volref.pipeline.run import RunSettings
from volref.stages.refine import Refined, RefineSettings, context, refine_region
from volref.stages.segment import SegmentSettings
from volref.synth import SynthConfig

F = TypeVar("F", bound=Callable[..., Any])

# ---------------------------------------------------------------- configs

#: tiny model configurations for fast CPU tests
TINY_MAE = MAEConfig(tile=32, width=32, depth=2, heads=2, decoder_width=16, decoder_depth=1,
                     decoder_heads=2)
TINY_UNET = UNetConfig(base=4, levels=2)

#: small, dense phantom: three mitochondria, two of them degraded, chunks that split them
SMALL = SynthConfig(shape=(16, 192, 256), seed=7, chunks=(8, 64, 128), density=8.0,
                    degraded_fraction=0.5)

#: every output array of a run, as the identity tests compare them
OUTPUTS = ("labels/volref-initial/s0", "volref/uncertainty/s0", "labels/volref-refined/s0",
           "labels/volref-mitochondria/s0")

#: blocks one by one in the calling process (no Dask cluster)
INLINE = ClusterSpec(workers=0)

#: a run in a child process with tiny models (argv: image, output, segmenter, refiner)
INLINE_JOB = """
import sys
from volref.engine.cluster import ClusterSpec
from volref.pipeline.run import RunSettings, run
from volref.classes import BACKGROUND
from volref.stages.refine import Refined, RefineSettings, context, refine_region
from volref.stages.segment import SegmentSettings
if __name__ == "__main__":
    run(sys.argv[1], output=sys.argv[2], cluster=ClusterSpec(workers=0),
        settings=RunSettings(segmenter=sys.argv[3], refiner=sys.argv[4],
                             segment=SegmentSettings(tile=64, halo=16),
                             refine=RefineSettings(tile=32, stride=16, tau=0.3),
                             block_shape=(8, 64, 128)))
"""


def tiny(models: tuple[str, str], **kw: Any) -> RunSettings:
    """Run settings for the tiny models (``models``: segmenter and refiner files), in the
    default precision (``auto``: fp32 on a CPU without bf16 instructions, as in CI), which the
    identity tests compare between this process and single-threaded worker processes."""
    seg, mae = models
    return RunSettings(segmenter=seg, refiner=mae, segment=SegmentSettings(tile=64, halo=16),
                       refine=RefineSettings(tile=32, stride=16, tau=0.3), **kw)


def refine_slice(model: torch.nn.Module, labels: np.ndarray, uncertainty: np.ndarray,
                 settings: RefineSettings) -> Refined:
    """Refine one slice given with ``settings.margin`` pixels of context on every side (outside
    the volume: background, zero uncertainty) with ``refine_region``; results without z."""
    extra = context(settings, model.config.patch) - settings.margin
    lab = np.pad(labels, extra, constant_values=BACKGROUND)[None]
    unc = np.pad(uncertainty, extra, constant_values=0.0)[None]
    r = refine_region(model, lab, unc, settings)
    return Refined(labels=r.labels[0], removed=r.removed[0], rebuilt=r.rebuilt[0],
                   tiles_total=r.tiles_total, tiles_run=r.tiles_run)


# ---------------------------------------------------------------- GPU


def gpu_test(fn: F) -> F:
    """Mark a test ``gpu`` and skip it where torch sees no CUDA device."""
    marked = pytest.mark.gpu(fn)
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(marked)


def ground_truth_pool(phantom: Path, crop: int = 32):
    """A tiny refiner training set: ``crop`` x ``crop`` tiles of a phantom's ground truth, certain
    everywhere (a :class:`~volref.train.refiner.TilePool`)."""
    from volref.layout import GROUND_TRUTH
    from volref.train.refiner import tile_pool

    truth = np.asarray(zarr.open_group(str(phantom), mode="r")[f"labels/{GROUND_TRUTH}/s0"][:])
    return tile_pool([(truth, np.zeros(truth.shape, np.float32))], crop, 0.3)


# ---------------------------------------------------------------- stores


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file below ``path`` (relative path -> digest)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            f = Path(root) / name
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_same(store: Path, expected: dict[str, np.ndarray]) -> None:
    """Every array of ``expected`` (path in ``store`` -> values) equals the store's."""
    root = zarr.open_group(store, mode="r")
    for key, want in expected.items():
        np.testing.assert_array_equal(root[key][:], want, err_msg=key)


def write_image(path: Path, data: np.ndarray, axes: str, *, version: str = "0.5",
                chunks: tuple[int, ...] | None = None, levels: int = 1,
                types: dict[str, str] | None = None) -> None:
    """Write an OME-Zarr image of any 2-5-D numpy array with volref's writer."""
    root = open_group(path, mode="w-", zarr_format=3 if version == "0.5" else 2)
    kinds = types or {"t": "time", "c": "channel"}
    ax = tuple(Axis(a, kinds.get(a, "space"), "micrometer" if a in "zyx" else None) for a in axes)
    chunks = chunks or data.shape
    levels_ = pyramid_geometry(data.shape[-3:], (1.0,) * 3, levels, chunks[-3:], data.dtype,
                               version, method="nearest")
    lead = data.shape[:-3] if data.ndim > 3 else ()
    if data.ndim < 3:  # 2-D: write by hand
        arr = root.create_array("s0" if version == "0.5" else "0", data=data)
        meta = {"axes": [a.to_dict() for a in ax], "datasets": [{"path": arr.basename,
                "coordinateTransformations": [{"type": "scale", "scale": [1.0] * data.ndim}]}]}
        root.attrs["ome"] = {"version": "0.5", "multiscales": [meta]}
        return
    levels_ = [lv.__class__(path=lv.path, shape=lead + lv.shape, chunks=(1,) * len(lead) + lv.chunks,
                            dtype=lv.dtype, scale=(1.0,) * len(lead) + lv.scale) for lv in levels_]
    arrays = create_multiscale(root, levels_, ax, version=version, name="test", method="nearest")
    dask.compute(store_pyramid(da.from_array(data, chunks=arrays[0].chunks), arrays, "nearest"),
                 scheduler="threads")


def records(out: Path, stage: str) -> int:
    """How many block records ``stage`` has written into the run output ``out``."""
    d = out / "volref" / "manifests" / stage / "blocks"
    return len(list(d.glob("*.json"))) if d.exists() else 0


# ---------------------------------------------------------------- a real Dask cluster


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process group, SIGKILL what is still there after 20 s, reap them all."""
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _dask(*args: str, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "dask"
    with log.open("w") as f:
        return subprocess.Popen([str(exe), *args], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def dask_cluster(tmp_path: Path, workers: dict[str, list[str]],
                 procs: list[subprocess.Popen[bytes]]) -> str:
    """Start ``dask scheduler`` and one ``dask worker`` per name (with its extra arguments) as
    separate processes on loopback, appending them to ``procs`` (the caller ends them with
    :func:`stop`); returns the address once every worker has joined."""
    from distributed import Client

    sched_file = tmp_path / "scheduler.json"
    procs.append(_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                       "--scheduler-file", str(sched_file), log=tmp_path / "scheduler.log"))
    deadline = time.monotonic() + 60
    while not sched_file.exists():
        assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
        time.sleep(0.1)
    for name, extra in workers.items():
        procs.append(_dask("worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                           "--no-dashboard", "--name", name, "--host", "127.0.0.1", *extra,
                           log=tmp_path / f"{name}.log"))
    address: str = json.loads(sched_file.read_text())["address"]
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(len(workers), timeout=120)
    return address


#: a smaller phantom for runs through the command line on clusters (two blocks deep)
CLUSTER_PHANTOM = SynthConfig(shape=(20, 128, 128), seed=7, chunks=(10, 64, 64), density=8.0,
                              degraded_fraction=0.5)


def cli_tiny(models) -> list[str]:
    """The command line's options for the tiny models (segment tiles stay at their default)."""
    seg, mae = models
    return ["--segmenter", seg, "--refiner", mae, "--stride", "16", "--tau", "0.3"]


# ---------------------------------------------------------------- napari-ome-zarr's reader
# Loading napari-ome-zarr's reader without napari's GUI stack.
#
# napari-ome-zarr's reader (``napari_get_reader``: how it finds nodes, names layers, reads
# colours, contrast limits and properties) needs from napari only a colormap record and an affine
# transform (``napari.utils.colormaps.Colormap``/``AVAILABLE_COLORMAPS``,
# ``napari.utils.transforms.Affine``). napari itself pulls a Qt/vispy stack and registers a pytest
# plugin that fails under this suite's warnings-as-errors, so the test extras install
# napari-ome-zarr without dependencies (Makefile) and, when napari is absent, these two small
# classes stand in for napari's. With napari installed, napari's own are used.


class Colormap:
    """Colours at control points (what the reader compares and hands to napari)."""

    def __init__(self, colors, controls=None, interpolation: str = "linear", name: str = ""):
        self.colors = np.asarray(colors, dtype=float)
        n = len(self.colors)
        self.controls = (np.linspace(0, 1, n) if controls is None
                         else np.asarray(controls, dtype=float))
        self.interpolation = interpolation
        self.name = name


class Affine:
    """An (N+1)x(N+1) homogeneous transform built from scale, translation or a matrix."""

    def __init__(self, scale=None, translate=None, affine_matrix=None):
        if affine_matrix is not None:
            self.affine_matrix = np.asarray(affine_matrix, dtype=float)
            return
        n = len(scale if scale is not None else translate)
        m = np.eye(n + 1)
        if scale is not None:
            m[np.arange(n), np.arange(n)] = scale
        if translate is not None:
            m[:n, n] = translate
        self.affine_matrix = m

    @property
    def scale(self) -> np.ndarray:
        return np.linalg.norm(self.affine_matrix[:-1, :-1], axis=0)

    @scale.setter
    def scale(self, value) -> None:
        linear = self.affine_matrix[:-1, :-1]
        self.affine_matrix[:-1, :-1] = linear / self.scale * np.asarray(value, dtype=float)

    @property
    def translate(self) -> np.ndarray:
        return self.affine_matrix[:-1, -1]

    def compose(self, other: Affine) -> Affine:
        """``self`` after ``other``."""
        return Affine(affine_matrix=self.affine_matrix @ other.affine_matrix)


def napari_get_reader():
    """napari-ome-zarr's ``napari_get_reader`` (skips the test when it is not installed)."""
    try:
        importlib.import_module("napari.utils")
    except ImportError:
        napari = types.ModuleType("napari")
        utils = types.ModuleType("napari.utils")
        colormaps = types.ModuleType("napari.utils.colormaps")
        colormaps.Colormap, colormaps.AVAILABLE_COLORMAPS = Colormap, {}
        transforms = types.ModuleType("napari.utils.transforms")
        transforms.Affine = Affine
        napari.utils, utils.colormaps, utils.transforms = utils, colormaps, transforms
        sys.modules.update({"napari": napari, "napari.utils": utils,
                            "napari.utils.colormaps": colormaps,
                            "napari.utils.transforms": transforms})
    reader = pytest.importorskip("napari_ome_zarr")
    return reader.napari_get_reader


# ---------------------------------------------------------------- HTTP


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file handler that does not log every request."""

    def log_message(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(directory: Path, handler: type = QuietHandler) -> Iterator[int]:
    """Serve ``directory`` over HTTP on 127.0.0.1 with ``handler``; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
