"""The user's archive as a property: volref writes only inside groups it created, never deletes
or rewrites anything else (``--overwrite`` included), merges the ``labels`` list, and a refused
command leaves no trace. Label pyramids follow the image's real factors in every axis."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tests.helpers import INLINE, tiny, tree_digest, write_image
from volref.cli.main import main
from volref.io import Axis, create_label_image, create_multiscale, label_levels, store_pyramid
from volref.io.ngff import Level, read_multiscale
from volref.pipeline.run import run


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("volref: error: "), err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _labels_attr(path):
    return dict(zarr.open_group(path / "labels", mode="r").attrs)["ome"]["labels"]


def _foreign_label_image(path, name):
    """A label image another tool wrote under a name volref uses, listed in ``labels``."""
    root = zarr.open_group(path, mode="r+")
    group = root["labels"].create_group(name)
    group.create_array("0", shape=(4, 8, 8), dtype="uint8", chunks=(4, 8, 8))[:] = 7
    group.attrs["ome"] = {"version": "0.5", "image-label": {},
                          "multiscales": [{"axes": [{"name": a} for a in "zyx"],
                                           "datasets": [{"path": "0"}],
                                           "metadata": {"method": "another tool"}}]}
    labels = root["labels"]
    ome = dict(labels.attrs["ome"])
    ome["labels"] = [*ome["labels"], name]
    labels.attrs["ome"] = ome


def _segment(phantom, models, *extra):
    return main(["-q", "segment", str(phantom), "--workers", "0", "--segmenter", models[0],
                 *extra])


def _run_segment(phantom, models, overwrite=False):
    return run(phantom, settings=tiny(models, overwrite=overwrite), stages=("segment",),
               cluster=INLINE)


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_label_image_volref_did_not_write_is_never_replaced(phantom_copy, models, capsys,
                                                              overwrite):
    _foreign_label_image(phantom_copy, "volref-initial")
    before = tree_digest(phantom_copy)
    line = _one_line(capsys, _segment(phantom_copy, models, *overwrite),
                     "labels/volref-initial", "not written by volref")
    assert "pass --overwrite" not in line  # the refusal must not suggest what it refuses
    assert tree_digest(phantom_copy) == before


@pytest.mark.parametrize("value", ["ground-truth", {"a": 1}, ["ground-truth", 3]])
def test_a_labels_attribute_that_is_not_a_list_of_names_is_refused_not_replaced(
        phantom_copy, models, capsys, value):
    labels = zarr.open_group(phantom_copy / "labels", mode="r+")
    labels.attrs["ome"] = {**labels.attrs["ome"], "labels": value}
    before = tree_digest(phantom_copy)
    _one_line(capsys, _segment(phantom_copy, models), "'labels' attribute")
    assert tree_digest(phantom_copy) == before
    assert not (phantom_copy / "labels" / "volref-initial").exists()


def test_the_labels_list_is_merged_and_keeps_the_users_entries(phantom_copy, models, capsys):
    _foreign_label_image(phantom_copy, "mine")
    listed = _labels_attr(phantom_copy)
    _run_segment(phantom_copy, models)
    assert _labels_attr(phantom_copy) == [*listed, "volref-initial", "volref-uncertainty"]
    mine = zarr.open_group(phantom_copy / "labels" / "mine", mode="r")
    assert (mine["0"][:] == 7).all()
    # volref marks what it creates, and only that
    made = zarr.open_group(phantom_copy / "labels" / "volref-initial", mode="r")
    assert made.attrs["volref"]["created_by"] == "volref"
    assert "volref" not in mine.attrs
    # rerunning with --overwrite replaces volref's own label image, lists it once
    _run_segment(phantom_copy, models, overwrite=True)
    assert _labels_attr(phantom_copy) == [*listed, "volref-initial", "volref-uncertainty"]


def test_a_refused_segment_leaves_no_trace(phantom_copy, models, capsys):
    root = zarr.open_group(phantom_copy, mode="r+")
    root["volref"].create_group("uncertainty")  # results without a manifest: refused
    before = tree_digest(phantom_copy)
    listed = _labels_attr(phantom_copy)
    _one_line(capsys, _segment(phantom_copy, models), "volref/uncertainty exists")
    assert tree_digest(phantom_copy) == before
    assert not (phantom_copy / "labels" / "volref-initial").exists()
    assert _labels_attr(phantom_copy) == listed
    # so the next run is not blamed on an empty labels/volref-initial
    _one_line(capsys, _segment(phantom_copy, models), "volref/uncertainty exists")


def _float_image(path, nan_at=None, labelled=False):
    """A float image (two blocks of 8 slices), with a NaN at ``nan_at``; ``labelled``: with a
    label image another tool wrote, listed in ``labels``."""
    data = np.random.default_rng(0).random((16, 64, 64)).astype(np.float32) * 1000
    if nan_at is not None:
        data[nan_at] = np.nan
    write_image(path, data, "zyx", chunks=(8, 64, 64))
    if labelled:
        zarr.open_group(path, mode="r+").create_group("labels").attrs["ome"] = {
            "version": "0.5", "labels": []}
        _foreign_label_image(path, "mine")
    return path


def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("labelled", [False, True], ids=["plain", "labelled"])
@pytest.mark.parametrize("case", ["junk checkpoint", "NaN in the sample", "NaN in a block"])
def test_a_refused_run_leaves_nothing_new_in_the_archive(tmp_path, models, capsys, case,
                                                         labelled):
    """Refusals before any block finished (a junk checkpoint, a NaN the intensity sample sees)
    and blocks that refuse their data (a NaN only a block sees: the second block's, after the
    first one finished) leave the user's archive as it was: no ``volref/`` group, no listed
    ``labels/volref-initial``, the ``labels`` document's bytes."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk" * 100)
    img = _float_image(tmp_path / "img.ome.zarr",
                       None if case == "junk checkpoint" else (12, 30, 30), labelled)
    before, files = tree_digest(img), _listing(img)
    args = {"junk checkpoint": ["--segmenter", str(junk)],
            "NaN in the sample": ["--segmenter", models[0]],
            "NaN in a block": ["--segmenter", models[0], "--intensity-range", "0", "1000"]}[case]
    line = _one_line(capsys, main(["-q", "run", str(img), "--workers", "0", "--refiner",
                                   models[1], *args]))
    assert ("safetensors" if case == "junk checkpoint" else "NaN or Inf") in line
    if case == "NaN in a block":  # the block's own voxel, counted once (not its margin's copy)
        assert "1 voxel in block 8-16_0-64_0-64" in line
    assert _listing(img) == files
    assert tree_digest(img) == before
    if labelled:
        assert _labels_attr(img) == ["mine"]


def test_a_refused_run_keeps_what_an_earlier_run_made(tmp_path, models, capsys):
    """Only what the refused run created goes: an earlier run's finished segment stage (its
    ``volref/`` group, its listed label image) stays as it was."""
    img = _float_image(tmp_path / "img.ome.zarr", labelled=True)
    assert main(["-q", "segment", str(img), "--workers", "0", "--segmenter", models[0]]) == 0
    before = tree_digest(img)
    code = main(["-q", "refine", str(img), "--workers", "0", "--refiner", models[1],
                 "--labels", "nothere", "--class-map", "background=0,ims=1,cristae=2,matrix=3"])
    _one_line(capsys, code, "nothere")
    assert tree_digest(img) == before
    assert _labels_attr(img) == ["mine", "volref-initial", "volref-uncertainty"]


def test_a_run_refused_the_lock_removes_nothing(tmp_path, models, capsys, monkeypatch):
    """What appeared since the refused run looked is the lock holder's work: it stays."""
    import volref.pipeline.run
    from volref.engine.lock import StoreLockedError

    def held(root, where):  # another run made its volref/ and a label image, and holds the lock
        root.require_group("volref")
        root.require_group("labels").create_group("volref-initial")
        raise StoreLockedError(f"{where} is being written by another volref run")

    img = _float_image(tmp_path / "img.ome.zarr")
    monkeypatch.setattr(volref.pipeline.run, "lock", held)
    code = main(["-q", "run", str(img), "--workers", "0", "--segmenter", models[0]])
    _one_line(capsys, code, "another volref run")
    assert (img / "volref").is_dir() and (img / "labels" / "volref-initial").is_dir()


def test_synth_overwrite_replaces_only_volrefs_own_stores(tmp_path, capsys):
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").create_array("data", shape=(4,), dtype="uint8")[:] = 3
    before = tree_digest(other)
    code = main(["-q", "synth", str(other), "--shape", "4", "32", "32", "--overwrite"])
    _one_line(capsys, code, "volref did not create it")
    assert tree_digest(other) == before
    mine = tmp_path / "mine.ome.zarr"
    assert main(["-q", "synth", str(mine), "--shape", "4", "32", "32"]) == 0
    assert main(["-q", "synth", str(mine), "--shape", "4", "32", "32", "--seed", "3",
                 "--overwrite"]) == 0


def test_label_pyramids_follow_the_images_factors_in_every_axis(tmp_path):
    """An image pyramid that halves z too: label level k must be level 0 sampled every 2**k
    voxels in z, y and x, not the first slices stretched over the stack."""
    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3)
    axes = tuple(Axis(n, "space", "micrometer") for n in "zyx")
    shapes = [(16, 32, 32), (8, 16, 16), (4, 8, 8)]
    levels = [Level(path=f"s{k}", shape=s, chunks=(4, 8, 8), dtype="uint8",
                    scale=(2.0**k, 2.0**k, 2.0**k)) for k, s in enumerate(shapes)]
    create_multiscale(root, levels, axes, version="0.5", name="img", method="mean")
    ms = read_multiscale(root)
    data = np.random.default_rng(0).integers(0, 4, size=shapes[0], dtype=np.uint8)
    _, arrays = create_label_image(root, "x", label_levels(ms, "uint8"), ms.axes, version="0.5")
    import dask
    import dask.array as da

    dask.compute(store_pyramid(da.from_array(data, chunks=(4, 8, 8)), arrays, "nearest"),
                 scheduler="sync")
    for k in range(3):
        f = 2**k
        np.testing.assert_array_equal(arrays[k][:], data[::f, ::f, ::f], err_msg=f"level {k}")
    labels = read_multiscale(root["labels/x"])
    assert [lv.shape for lv in labels.levels] == shapes
    assert [lv.scale for lv in labels.levels] == [lv.scale for lv in ms.levels]


@pytest.mark.parametrize("method", ["nearest", "mean"])
def test_a_pyramid_is_the_same_bytes_for_any_chunks_a_task(tmp_path, monkeypatch, method):
    """Pyramid tasks take several small chunks each (fewer tasks on a large archive); the levels
    are the same bytes as with one chunk a task, odd shapes and partial edge chunks included."""
    import dask
    import dask.array as da

    from volref.io import write as writing

    shapes = [(9, 45, 37), (9, 22, 18), (9, 11, 9)]
    data = np.random.default_rng(1).integers(0, 250, size=shapes[0]).astype(np.uint8)
    got = []
    for cap in (1, 2**23):
        monkeypatch.setattr(writing, "PYRAMID_TASK_VOXELS", cap)
        root = zarr.open_group(tmp_path / f"{cap}.zarr", mode="w", zarr_format=3)
        arrays = [root.create_array(f"s{k}", shape=s, chunks=(2, 4, 4), dtype="uint8")
                  for k, s in enumerate(shapes)]
        assert writing.chunk_multiples((2, 4, 4), (1, 2, 2), shapes[1]) == (
            (1, 1, 1) if cap == 1 else (8, 8, 8))
        dask.compute(store_pyramid(da.from_array(data, chunks=(2, 4, 4)), arrays, method),
                     scheduler="sync")
        got.append([a[:] for a in arrays])
    for k in range(3):
        np.testing.assert_array_equal(got[0][k], got[1][k], err_msg=f"level {k}")
    if method == "nearest":
        np.testing.assert_array_equal(got[1][2], data[:, ::4, ::4][:, :11, :9])
