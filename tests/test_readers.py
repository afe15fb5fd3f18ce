"""volref's outputs opened by the community's readers: ome-zarr-models (validation), ome-zarr-py
(every node, every level), napari-ome-zarr (the layers napari would show) and ngio (tables) —
for a separate ``--output`` store and for results written into the input's archive."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from tests import helpers
from tests.helpers import INLINE, tiny
from volref.io import validate_image
from volref.pipeline.publish import STEPS, steps
from volref.pipeline.run import run

LABELS = ("volref-initial", "volref-refined", "volref-mitochondria", "volref-uncertainty")


@pytest.fixture(scope="module")
def in_archive(small_phantom, models, tmp_path_factory):
    path = tmp_path_factory.mktemp("archive") / "copy.ome.zarr"
    shutil.copytree(small_phantom, path)
    run(path, settings=tiny(models), cluster=INLINE)
    return path


@pytest.fixture(params=["output store", "in archive"])
def store(request, reference, in_archive):
    return reference[0] if request.param == "output store" else in_archive


def test_stores_validate_with_ome_zarr_models(store):
    root = zarr.open_group(store, mode="r")
    validate_image(root)  # the root image and every label image it lists
    validate_image(root["volref/uncertainty"])
    listed = root["labels"].attrs["ome"]["labels"]
    assert set(LABELS) <= set(listed)
    source = root["labels/volref-initial"].attrs["ome"]["image-label"]["source"]["image"]
    assert "multiscales" in zarr.open_group(store / "labels/volref-initial" / source,
                                            mode="r").attrs["ome"]


def test_ome_zarr_py_reads_every_node_and_level(store, small_phantom):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = [n for n in Reader(parse_url(str(store)))() if n.data]  # not the 'labels' group
    image = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
    labels = {n.zarr.path.rstrip("/").rsplit("/", 1)[-1]: n for n in nodes if n.load(Label)}
    assert len(image) == 1 and set(LABELS) <= set(labels)
    src = zarr.open_group(small_phantom, mode="r")
    levels = [k for k in ("s0", "s1", "s2") if k in src]
    for node in nodes:
        assert len(node.data) == len(levels)
        for level, name in zip(node.data, levels):
            assert level.shape[-3:] == src[name].shape[-3:]
            np.asarray(level[..., :2, :8, :8])  # every level reads
    np.testing.assert_array_equal(np.asarray(image[0].data[0][..., 3, :, :]),
                                  src["s0"][3])


def test_napari_ome_zarr_shows_image_labels_and_uncertainty(store):
    napari_get_reader = helpers.napari_get_reader()
    layers = napari_get_reader(str(store))()
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == 1
    by_name = {meta["name"].rsplit("/", 1)[-1]: (data, meta) for data, meta, kind in layers
               if kind == "labels"}
    assert set(LABELS) <= set(by_name)
    data, meta = by_name["volref-uncertainty"]
    assert len(meta["colormap"]) == STEPS + 1  # every value has a colour
    assert meta["properties"]["uncertainty"][-1] == "0.9-1.0"
    assert int(np.asarray(data[0]).max()) <= STEPS
    assert len(by_name["volref-initial"][1]["colormap"]) == 4
    # the uncertainty image opened by its path: named, with contrast limits
    ((_, umeta, ukind),) = napari_get_reader(str(store / "volref" / "uncertainty"))()
    assert ukind == "image" and umeta["name"].startswith("volref uncertainty")
    assert umeta["contrast_limits"] == [0.0, 255.0]


def test_ngio_lists_and_reads_the_mitochondria_table(store):
    import ngio

    container = ngio.open_ome_zarr_container(str(store))
    assert "volref-mitochondria" in container.list_tables()
    table = container.get_table("volref-mitochondria")
    df = table.dataframe
    ids = zarr.open_group(store, mode="r")["labels/volref-mitochondria/s0"][:]
    n = int(ids.max())
    assert n > 0 and len(df) == n  # one row per mitochondrion
    assert sorted(df.index if df.index.name == "label" else df["label"]) == list(range(1, n + 1))
    assert table.reference_label == "volref-mitochondria"
    attrs = zarr.open_group(store / "tables" / "volref-mitochondria", mode="r").attrs
    assert attrs["volref"]["units"]["volume_um3"] == "micrometer^3"


def test_volref_commands_open_an_output_store(reference, tmp_path, capsys):
    from volref.cli.main import main

    out = reference[0]
    assert main(["info", str(out)]) == 0
    assert "volref-mitochondria" in capsys.readouterr().out
    assert main(["snapshot", str(out), str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_uncertainty_steps():
    u = np.array([0, 1, 25, 26, 128, 254, 255], dtype=np.uint8)
    np.testing.assert_array_equal(steps(u), [0, 1, 1, 2, 6, 10, 10])
