"""OME-Zarr I/O: reading 0.4/0.5 and 3-5-D images, writing validated label images, refusals."""

from __future__ import annotations

import json
import os
import stat

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from tests.helpers import SMALL, tree_digest, write_image
from volref.classes import CLASS_COLORS, CLASS_PROPERTIES, N_CLASSES
from volref.errors import (
    InputNotFoundError,
    InvalidMetadataError,
    InvalidNameError,
    NotOmeZarrError,
    OutputError,
    OutputExistsError,
    UnsupportedImageError,
)
from volref.io import (
    LabelInfo,
    create_label_image,
    label_levels,
    label_names,
    open_group,
    open_image,
    open_multiscale,
    store_pyramid,
    validate_image,
    validate_label_image,
)
from volref.io.store import check_writable_group, read_file, read_files, write_file
from volref.pipeline import write_phantom
from volref.synth import SynthConfig

# ---------------------------------------------------------------- reading


def test_open_phantom_volume(small_phantom):
    vol = open_image(small_phantom)
    assert vol.shape == SMALL.shape
    assert vol.dtype == np.uint16
    assert vol.scale == SMALL.voxel_size_um
    assert vol.units == ("micrometer",) * 3
    assert vol.selection == {}
    assert set(label_names(vol.group)) == {"ground-truth", "ground-truth-instances", "degraded"}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_phantom_validates_and_reads_back_with_ome_zarr_py(tmp_path, version):
    path = tmp_path / "p.ome.zarr"
    cfg = SynthConfig(shape=(8, 512, 512), seed=3, chunks=(8, 256, 256))
    dask.compute(write_phantom(cfg, path, version=version))
    root = zarr.open_group(path, mode="r")
    validate_image(root)
    assert root.metadata.zarr_format == (3 if version == "0.5" else 2)
    nodes = list(Reader(parse_url(str(path)))())
    shapes = {str(n.zarr.path).rstrip("/").split("/")[-1]: [d.shape for d in n.data] for n in nodes}
    assert shapes["p.ome.zarr"] == [(8, 512, 512), (8, 256, 256)]
    for name in ("ground-truth", "ground-truth-instances", "degraded"):
        assert shapes[name] == [(8, 512, 512), (8, 256, 256)]  # as many levels as the image
    # level 1 of the labels is the top-left sample of level 0
    gt = root["labels/ground-truth"]
    p0, p1 = ("s0", "s1") if version == "0.5" else ("0", "1")
    np.testing.assert_array_equal(gt[p1][:], gt[p0][:, ::2, ::2])
    img = root[p0][:].astype(float)
    expected = np.rint(img.reshape(8, 256, 2, 256, 2).mean(axis=(2, 4)))
    np.testing.assert_array_equal(root[p1][:], expected)
    # codecs (benchmarks.compression): labels zstd 5 + bit shuffle, intensities zstd 1
    for path, cname, level, shuffle in ((p0, "zstd", 1, "bitshuffle"),
                                        (f"labels/ground-truth/{p0}", "zstd", 5, "bitshuffle")):
        arr = root[path]
        codec = arr.compressors[0]
        if version == "0.5":
            assert (codec.cname.value, codec.clevel, codec.shuffle.value) == (cname, level, shuffle)
        else:
            assert (codec.cname, codec.clevel, codec.shuffle) == (cname, level, 2)


def test_image_label_metadata_is_napari_compatible(small_phantom):
    root = zarr.open_group(small_phantom, mode="r")
    meta = dict(root["labels/ground-truth"].attrs)["ome"]["image-label"]
    colours = {c["label-value"]: c["rgba"] for c in meta["colors"]}
    assert sorted(colours) == list(range(N_CLASSES))  # every class listed, or napari hides some
    assert all(len(c) == 4 and all(0 <= v <= 255 for v in c) for c in colours.values())
    assert meta["properties"] == [dict(p) for p in CLASS_PROPERTIES]
    assert meta["source"] == {"image": "../../"}
    inst = dict(root["labels/ground-truth-instances"].attrs)["ome"]["image-label"]
    assert "colors" not in inst  # instance ids: napari picks colours itself


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64", "int16"])
def test_supported_dtypes_open(tmp_path, dtype):
    data = (np.arange(4 * 16 * 16) % 7).reshape(4, 16, 16).astype(dtype)
    write_image(tmp_path / "i.ome.zarr", data, "zyx")
    vol = open_image(tmp_path / "i.ome.zarr")
    assert vol.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.data.compute(), data)


@pytest.mark.parametrize("dtype", ["bool", "complex64"])
def test_unsupported_dtypes_refused(tmp_path, dtype):
    write_image(tmp_path / "i.ome.zarr", np.zeros((4, 8, 8), dtype=dtype), "zyx")
    with pytest.raises(UnsupportedImageError, match="pixel type"):
        open_image(tmp_path / "i.ome.zarr")


def test_five_d_needs_channel_choice(tmp_path):
    data = np.arange(1 * 3 * 4 * 8 * 8, dtype=np.uint16).reshape(1, 3, 4, 8, 8)
    write_image(tmp_path / "i.ome.zarr", data, "tczyx")
    with pytest.raises(UnsupportedImageError, match="3 channels.*--channel"):
        open_image(tmp_path / "i.ome.zarr")
    vol = open_image(tmp_path / "i.ome.zarr", channel=2)
    assert vol.shape == (4, 8, 8)
    assert vol.selection == {"t": 0, "c": 2}
    np.testing.assert_array_equal(vol.data.compute(), data[0, 2])
    with pytest.raises(UnsupportedImageError, match="out of range"):
        open_image(tmp_path / "i.ome.zarr", channel=3)


def test_four_d_with_time_needs_timepoint(tmp_path):
    data = np.zeros((2, 4, 8, 8), dtype=np.uint8)
    write_image(tmp_path / "i.ome.zarr", data, "tzyx")
    with pytest.raises(UnsupportedImageError, match="--timepoint"):
        open_image(tmp_path / "i.ome.zarr")
    assert open_image(tmp_path / "i.ome.zarr", timepoint=1).shape == (4, 8, 8)
    with pytest.raises(UnsupportedImageError, match="no channel axis"):
        open_image(tmp_path / "i.ome.zarr", timepoint=1, channel=0)


def test_two_d_image_refused(tmp_path):
    write_image(tmp_path / "i.ome.zarr", np.zeros((16, 16), dtype=np.uint8), "yx")
    with pytest.raises(UnsupportedImageError, match="3-D z-stack"):
        open_image(tmp_path / "i.ome.zarr")


def test_missing_path_and_plain_zarr(tmp_path):
    with pytest.raises(InputNotFoundError):
        open_image(tmp_path / "nothing.ome.zarr")
    zarr.create_array(str(tmp_path / "plain.zarr"), shape=(4, 4, 4), dtype="uint8")
    with pytest.raises(NotOmeZarrError, match="plain zarr array"):
        open_image(tmp_path / "plain.zarr")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    with pytest.raises(NotOmeZarrError, match="multiscales"):
        open_image(tmp_path / "group.zarr")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(NotOmeZarrError):
        open_image(tmp_path / "file.txt")


def _break(path, fn):
    meta = json.loads((path / "zarr.json").read_text())
    fn(meta["attributes"]["ome"]["multiscales"][0])
    (path / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("breakage, match", [
    (lambda m: m.pop("datasets"), "datasets"),
    (lambda m: m.pop("axes"), "axes"),
    (lambda m: m["axes"].append({"name": "q", "type": "space"}), "4 finite numbers"),
    (lambda m: (m["axes"].insert(0, {"name": "c", "type": "channel"}),
                m["datasets"][0]["coordinateTransformations"][0]["scale"].append(1.0)),
     "3 dimensions but 4 axes"),
    (lambda m: m["axes"].__setitem__(0, {"name": "y", "type": "space"}), "duplicate"),
    (lambda m: m["datasets"][0]["coordinateTransformations"][0].__setitem__("scale", [1, 1]),
     "3 finite numbers"),
    (lambda m: m["datasets"][0]["coordinateTransformations"][0].__setitem__("scale", [1, 0, 1]),
     "> 0"),
    (lambda m: m["datasets"][0].pop("coordinateTransformations"), "coordinateTransformations"),
    (lambda m: m["datasets"][0].__setitem__("path", "missing"), "missing"),
    (lambda m: m["datasets"][0].__setitem__("path", "../escape"), "invalid name"),
    (lambda m: m.__setitem__("axes", ["z", "y", "x"]), "plain strings"),
])
def test_broken_metadata_is_reported(tmp_path, breakage, match):
    path = tmp_path / "i.ome.zarr"
    write_image(path, np.zeros((4, 8, 8), dtype=np.uint8), "zyx")
    _break(path, breakage)
    with pytest.raises((InvalidMetadataError, InvalidNameError), match=match):
        open_image(path)


def test_wrong_axis_order_refused(tmp_path):
    path = tmp_path / "i.ome.zarr"
    write_image(path, np.zeros((4, 8, 8), dtype=np.uint8), "xyz")
    with pytest.raises(UnsupportedImageError, match="z, y, x"):
        open_image(path)


def test_ngff_04_reads_like_05(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (6, 32, 32), dtype=np.uint16)
    write_image(tmp_path / "a.ome.zarr", data, "zyx", version="0.4", chunks=(3, 16, 16), levels=2)
    write_image(tmp_path / "b.ome.zarr", data, "zyx", version="0.5", chunks=(3, 16, 16), levels=2)
    a, b = open_image(tmp_path / "a.ome.zarr"), open_image(tmp_path / "b.ome.zarr")
    assert a.multiscale.version == "0.4" and b.multiscale.version == "0.5"
    np.testing.assert_array_equal(a.data.compute(), b.data.compute())
    assert [lv.shape for lv in a.multiscale.levels] == [lv.shape for lv in b.multiscale.levels]
    assert open_image(tmp_path / "a.ome.zarr", level=1).shape == (6, 16, 16)


# ---------------------------------------------------------------- writing labels


def _add_labels(root, image_ms, name="volref-test", overwrite=False):
    data = da.from_array(np.full(image_ms.levels[0].shape[-3:], 2, dtype=np.uint8))
    levels = label_levels(image_ms, "uint8")
    _, arrays = create_label_image(root, name, levels, image_ms.axes, version=image_ms.version,
                                   info=LabelInfo(CLASS_COLORS, CLASS_PROPERTIES),
                                   overwrite=overwrite)
    lead = image_ms.ndim - 3
    dask.compute(store_pyramid(data[(None,) * lead], arrays, "nearest"))


def test_adding_labels_to_the_input_adds_groups_only(phantom_copy):
    before = tree_digest(phantom_copy)
    root = open_group(phantom_copy, mode="r+")
    check_writable_group(root, phantom_copy)
    _, ms = open_multiscale(phantom_copy)
    _add_labels(root, ms)
    after = tree_digest(phantom_copy)
    changed = {k for k in before if before[k] != after.get(k)}
    # only the labels group's list changed; every array chunk and the image metadata are intact
    assert changed == {"labels/zarr.json"}
    assert set(label_names(zarr.open_group(phantom_copy, mode="r"))) >= {"volref-test",
                                                                        "ground-truth"}
    validate_image(zarr.open_group(phantom_copy, mode="r"))
    with pytest.raises(OutputExistsError):
        _add_labels(open_group(phantom_copy, mode="r+"), ms)
    _add_labels(open_group(phantom_copy, mode="r+"), ms, overwrite=True)
    assert label_names(zarr.open_group(phantom_copy, mode="r")).count("volref-test") == 1


def test_labels_for_a_five_d_image(tmp_path):
    path = tmp_path / "i.ome.zarr"
    write_image(path, np.zeros((1, 2, 4, 16, 16), dtype=np.uint16), "tczyx", levels=1)
    _, ms = open_multiscale(path)
    _add_labels(open_group(path, mode="r+"), ms)
    lab = zarr.open_group(path, mode="r")["labels/volref-test/s0"]
    assert lab.shape == (1, 1, 4, 16, 16)
    validate_image(zarr.open_group(path, mode="r"))


def test_labels_to_a_separate_output_store(small_phantom, tmp_path):
    before = tree_digest(small_phantom)
    _, ms = open_multiscale(small_phantom)
    out = open_group(tmp_path / "out.zarr", mode="w-")
    _add_labels(out, ms)
    validate_label_image(zarr.open_group(tmp_path / "out.zarr", mode="r")["labels/volref-test"])
    assert tree_digest(small_phantom) == before


def test_read_only_store_refused(phantom_copy):
    for root, dirs, files in os.walk(phantom_copy):
        for n in dirs + files:
            p = os.path.join(root, n)
            os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    os.chmod(phantom_copy, 0o555)
    try:
        before = tree_digest(phantom_copy)
        with pytest.raises(OutputError, match="read-only"):
            check_writable_group(open_group(phantom_copy, mode="r+"), phantom_copy)
        assert tree_digest(phantom_copy) == before
    finally:
        for root, _dirs, _ in os.walk(phantom_copy):
            os.chmod(root, 0o755)


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".hidden", "a\\b"])
def test_names_that_escape_are_refused(phantom_copy, name):
    _, ms = open_multiscale(phantom_copy)
    with pytest.raises(InvalidNameError):
        _add_labels(open_group(phantom_copy, mode="r+"), ms, name=name)


def test_many_small_files_are_read_together_with_the_same_bytes(tmp_path):
    """A stage's block records are read in one call (files read here on a local store, reads
    overlapped on any other): the same bytes as one by one, None where a file is missing or
    is a directory."""
    from zarr.storage import MemoryStore

    for root in (zarr.open_group(tmp_path / "r.zarr", mode="w"),
                 zarr.open_group(MemoryStore(), mode="w").require_group("sub")):
        names = [f"m/blocks/{i}.json" for i in range(150)]
        for i, name in enumerate(names):
            write_file(root, name, f'{{"i": {i}}}'.encode())
        asked = [*names, "m/blocks/gone.json", "m/blocks", "m/blocks/0.json/x"]
        assert read_files(root, asked) == [read_file(root, n) for n in asked]
        assert read_files(root, asked)[-3:] == [None, None, None]
        assert read_files(root, names)[7] == b'{"i": 7}' and read_files(root, []) == []
