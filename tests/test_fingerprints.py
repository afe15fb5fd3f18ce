"""What a stage records covers its inputs' content, and what it resumes is checked: a changed
image is refused (never mixed), output chunks lost after a run are recomputed (or, read by a
later stage, refused in one line), the metrics table is the same bytes however it was made,
lengths are micrometres whatever the axes' units, and a dropped connection says so."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import socket
import struct

import numpy as np
import pandas as pd
import pytest
import zarr

from tests.helpers import INLINE, OUTPUTS, QuietHandler, http_server, tiny, tree_digest, write_image
from volref.cli.main import main
from volref.errors import ConfigError
from volref.io.units import UnknownUnitError, spacing_um
from volref.pipeline.run import run
from volref.stages.measure import TABLE_DTYPES

BLOCKS = (10, 64, 64)  # 8 blocks of the cluster phantom (20 x 128 x 128, chunks 10 x 64 x 64)


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("volref: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def two_levels(cluster_phantom, tmp_path_factory):
    """The cluster phantom's voxels as a two-level image (20 x 128 x 128, chunks 10 x 64 x 64;
    read-only use)."""
    path = tmp_path_factory.mktemp("img") / "img.ome.zarr"
    data = zarr.open_group(cluster_phantom, mode="r")["s0"][:]
    write_image(path, data, "zyx", chunks=(10, 64, 64), levels=2)
    return path


@pytest.fixture()
def image(two_levels, tmp_path):
    """A private copy of :func:`two_levels` (modification times kept, as ``cp -p``)."""
    dst = tmp_path / "img.ome.zarr"
    shutil.copytree(two_levels, dst)
    return dst


@pytest.fixture(scope="module")
def finished(two_levels, models, tmp_path_factory):
    """A complete run on :func:`two_levels` in 8 blocks: the store, its arrays, table bytes."""
    out = tmp_path_factory.mktemp("fp") / "done.zarr"
    run(two_levels, output=out, settings=tiny(models, block_shape=BLOCKS), cluster=INLINE)
    root = zarr.open_group(out, mode="r")
    arrays = {f"{k}/{lv}": root[f"{k}/{lv}"][:] for k in ("labels/volref-initial",
              "labels/volref-refined", "labels/volref-mitochondria") for lv in ("s0", "s1")}
    return out, arrays, (out / "volref" / "metrics.parquet").read_bytes()


def _change_voxels(path, z=12):
    arr = zarr.open_group(path, mode="r+")["s0"]
    arr[z] = arr[z] // 2 + 7  # one slice of the image, rewritten


# ---------------------------------------------------------------- 1. the image's content


def test_a_changed_image_is_refused_not_mixed(image, models, tmp_path):
    """Interrupted (one of two blocks recorded) or finished, segment refuses a changed image;
    a later stage refuses results made from it; --overwrite recomputes from the new image."""
    out = tmp_path / "o.zarr"
    settings = tiny(models, block_shape=(10, 128, 128))
    run(image, output=out, settings=settings, stages=("segment",), cluster=INLINE)
    manifest = out / "volref" / "manifests" / "segment"
    (manifest / "done.json").unlink()  # as a kill leaves it: one block of two recorded
    sorted((manifest / "blocks").glob("*.json"))[1].unlink()
    _change_voxels(image)
    before = tree_digest(out)
    with pytest.raises(ConfigError, match=r"volref segment: the image changed .*level s0.*"
                                          "--overwrite") as info:
        run(image, output=out, settings=settings, cluster=INLINE)
    assert "\n" not in str(info.value)
    assert tree_digest(out) == before  # refused before anything was written
    # a later stage on results made from an image that changed since: refused too
    redo = dataclasses.replace(settings, overwrite=True)
    run(image, output=out, settings=redo, stages=("segment",), cluster=INLINE)
    _change_voxels(image, z=3)
    with pytest.raises(ConfigError, match="the image changed since volref segment made"):
        run(image, output=out, settings=settings, stages=("refine",), cluster=INLINE)
    # --overwrite recomputes: the bytes of a fresh run on the new image
    run(image, output=out, settings=redo, stages=("segment",), cluster=INLINE)
    fresh = tmp_path / "fresh.zarr"
    run(image, output=fresh, settings=settings, stages=("segment",), cluster=INLINE)
    a, b = zarr.open_group(out, mode="r"), zarr.open_group(fresh, mode="r")
    for key in OUTPUTS[:2]:
        np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=key)


def test_a_changed_image_is_one_line_on_the_command_line(image, models, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    cli = ["-q", "segment", str(image), "--output", str(out), "--workers", "0",
           "--block-shape", "20", "256", "256", "--segmenter", models[0]]
    assert main(cli) == 0
    _change_voxels(image)
    _one_line(capsys, main(cli), "the image changed", "level s0", "volref segment --overwrite")


def test_an_unchanged_image_resumes_and_its_record_holds_its_listing(finished, two_levels,
                                                                    models, tmp_path):
    out = tmp_path / "o.zarr"
    shutil.copytree(finished[0], out)
    again = run(two_levels, output=out, settings=tiny(models, block_shape=BLOCKS),
                cluster=INLINE)
    assert all(r.computed == 0 for r in again.reports if r.stage != "measure")
    record = json.loads((out / "volref/manifests/segment/settings.json").read_text())
    level = record["settings"]["inputs"]["image"]["s0"]
    assert level["files"] == 1 + 8 and level["bytes"] > 0  # zarr.json + 8 chunks


# ---------------------------------------------------------------- 2. outputs lost after a run


def test_lost_output_chunks_are_recomputed_or_refused(finished, two_levels, models,
                                                      tmp_path, capsys):
    out = tmp_path / "o.zarr"
    shutil.copytree(finished[0], out)
    chunks = sorted((out / "labels" / "volref-refined" / "s0" / "c").rglob("*"))
    chunks = [c for c in chunks if c.is_file()]
    assert len(chunks) >= 4
    for c in chunks[::2]:  # half of the refined labels' chunk files
        c.unlink()
    coarse = [c for c in (out / "labels" / "volref-initial" / "s1").rglob("*")
              if c.is_file() and c.name != "zarr.json"]
    coarse[0].unlink()  # and a chunk of a coarser level of another stage's output
    # a stage that reads them refuses in one line (volref measure: instances + measure)
    cli = ["-q", "measure", str(two_levels), "--output", str(out), "--workers", "0",
           "--block-shape", *map(str, BLOCKS)]
    _one_line(capsys, main(cli), "labels/volref-refined lost", "run volref refine again")
    # the stages that wrote them recompute exactly what is missing: the same bytes
    again = run(two_levels, output=out, settings=tiny(models, block_shape=BLOCKS),
                cluster=INLINE)
    assert again.report("segment").computed == 0  # its pyramid was rebuilt, no block
    assert again.report("refine").computed == len(chunks[::2])
    root = zarr.open_group(out, mode="r")
    for key, want in finished[1].items():  # every level
        np.testing.assert_array_equal(root[key][:], want, err_msg=key)
    assert (out / "volref" / "metrics.parquet").read_bytes() == finished[2]
    assert len(pd.read_parquet(out / "volref" / "metrics.parquet")) > 0
    assert coarse[0].exists()


# ---------------------------------------------------------------- 3. the table's bytes


def test_the_metrics_table_is_the_same_bytes_fresh_resumed_and_repeated(finished,
                                                                        two_levels,
                                                                        models, tmp_path):
    out = tmp_path / "o.zarr"
    shutil.copytree(finished[0], out)
    settings = tiny(models, block_shape=BLOCKS)
    table = pd.read_parquet(out / "volref" / "metrics.parquet")
    assert list(table.columns) == list(TABLE_DTYPES)
    assert {c: str(t) for c, t in table.dtypes.items()} == TABLE_DTYPES
    assert table["label"].is_monotonic_increasing
    run(two_levels, output=out, settings=settings, cluster=INLINE)  # repeated
    assert (out / "volref" / "metrics.parquet").read_bytes() == finished[2]
    manifest = out / "volref" / "manifests" / "measure"
    (manifest / "done.json").unlink()
    for pattern in ("stats-*.json", "mito-*.json"):  # resumed: some rows computed, some read
        for record in sorted((manifest / "blocks").glob(pattern))[::2]:
            record.unlink()
    run(two_levels, output=out, settings=settings, cluster=INLINE)
    assert (out / "volref" / "metrics.parquet").read_bytes() == finished[2]
    feature = out / "tables" / "volref-mitochondria" / "table.parquet"
    assert pd.read_parquet(feature).columns.tolist() == list(TABLE_DTYPES)


# ---------------------------------------------------------------- 4. units


def test_every_ngff_length_unit_converts_and_unknown_ones_are_refused():
    um, how = spacing_um((400.0, 150.0, 150.0), ("nanometer", "nanometer", "nanometer"))
    assert np.allclose(um, (0.4, 0.15, 0.15)) and how["assumed"] == []
    assert np.allclose(spacing_um((0.001, 1, 1), ("millimeter", "µm", "micrometres"))[0],
                       (1.0, 1.0, 1.0))
    assert np.allclose(spacing_um((1e-6, 1, 1), ("meter", "angstrom", "inch"))[0],
                       (1.0, 1e-4, 25_400.0))
    um, how = spacing_um((0.5, 0.1, 0.1), (None, None, "micrometer"))
    assert um == (0.5, 0.1, 0.1) and how["assumed"] == ["z", "y"]
    for bad in ("pixel", "second", "furlongs"):
        with pytest.raises(UnknownUnitError, match=f"unit '{bad}'"):
            spacing_um((1, 1, 1), (bad, "micrometer", "micrometer"))


def _with_units(src, dst, unit, factor):
    """A copy of the image ``src`` whose axes declare ``unit`` (scales times ``factor``)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    ms = meta["attributes"]["ome"]["multiscales"][0]
    for axis in ms["axes"]:
        if unit is None:
            axis.pop("unit", None)
        else:
            axis["unit"] = unit
    for ds in ms["datasets"]:
        for t in ds["coordinateTransformations"]:
            if t["type"] == "scale":
                t["scale"] = [v * factor for v in t["scale"]]
    (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def test_lengths_are_micrometres_whatever_the_axes_units(finished, two_levels, models,
                                                          tmp_path, capsys, caplog):
    base = pd.read_parquet(finished[0] / "volref" / "metrics.parquet")
    settings = tiny(models, block_shape=BLOCKS, overwrite=True)
    for unit, factor in (("nanometer", 1000.0), ("millimeter", 0.001), (None, 1.0)):
        img = _with_units(two_levels, tmp_path / f"{unit}.ome.zarr", unit, factor)
        out = tmp_path / f"{unit}.zarr"
        shutil.copytree(finished[0], out)  # the image's levels kept their listing
        run(img, output=out, settings=settings, stages=("measure",), cluster=INLINE)
        table = pd.read_parquet(out / "volref" / "metrics.parquet")
        for column in ("volume_um3", "skeleton_length_um"):
            np.testing.assert_allclose(table[column], base[column], rtol=1e-9, err_msg=unit)
        made = table.attrs["volref"]
        assert made["assumed"] == ([] if unit else ["z", "y", "x"])
        assert set(made["units"].values()) == {unit or "micrometer"}
    assert "have no unit; taking them as micrometres" in caplog.text
    img = _with_units(two_levels, tmp_path / "px.ome.zarr", "pixel", 1.0)
    _one_line(capsys, main(["-q", "run", str(img), "--workers", "0", "--output",
                            str(tmp_path / "px.zarr")]), "unit 'pixel'")
    assert not (tmp_path / "px.zarr").exists()  # refused before any work


# ---------------------------------------------------------------- 5. a dropped connection


@contextlib.contextmanager
def dropping_server(directory, dropped: str):
    """An HTTP server on 127.0.0.1 that resets the connection of every request for a path
    holding ``dropped`` (a store that goes away mid-run)."""
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            if dropped in self.path:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()  # RST: connection reset by peer
                return
            super().do_GET()

    with http_server(directory, Handler) as port:
        yield port


@pytest.mark.parametrize("dropped", ["/s0/c/", "/c/"])  # mid-run (blocks) / at the start
def test_a_dropped_connection_is_not_called_corrupt(tmp_path, models, capsys, dropped):
    data = (np.random.default_rng(0).random((8, 64, 64)) * 1000).astype(np.uint16)
    write_image(tmp_path / "img.ome.zarr", data, "zyx", chunks=(4, 32, 32), levels=2)
    before = tree_digest(tmp_path / "img.ome.zarr")
    with dropping_server(tmp_path, dropped) as port:
        url = f"http://user:hunter2@127.0.0.1:{port}/img.ome.zarr"
        line = _one_line(capsys, main(["-q", "segment", url, "--workers", "0", "--segmenter",
                                       models[0], "--output", str(tmp_path / "o.zarr")]),
                         "lost the connection to http://127.0.0.1")
    assert "corrupt" not in line and "hunter2" not in line and "reset" in line
    assert tree_digest(tmp_path / "img.ome.zarr") == before


def test_results_of_a_stage_without_a_record_of_the_image_still_resume(finished, models,
                                                                       two_levels,
                                                                       tmp_path):
    """Records written before fingerprints (no ``inputs``): later stages are not refused."""
    out = tmp_path / "o.zarr"
    shutil.copytree(finished[0], out)
    path = out / "volref" / "manifests" / "segment" / "settings.json"
    record = json.loads(path.read_text())
    del record["settings"]["inputs"]
    path.write_text(json.dumps(record))
    again = run(two_levels, output=out, settings=tiny(models, block_shape=BLOCKS),
                stages=("instances", "measure"), cluster=INLINE)
    assert again.report("instances").computed == 0
