"""Bring your own segmentation: ``volref refine --labels NAME --class-map MAP --uncertainty PATH``
and ``volref train refiner --labels NAME`` on label images another tool (ome-zarr-py) wrote."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from tests.helpers import OUTPUTS, TINY_MAE, cli_tiny, tree_digest
from volref.cli.main import main
from volref.errors import ImageDataError, SettingsError
from volref.stages.labels import (
    IDENTITY_MAP,
    UnmappedLabelError,
    check_fits,
    check_uncertainty,
    format_class_map,
    normalised_entropy,
    parse_class_map,
    to_classes,
    to_uncertainty,
)
from volref.stages.settings import LabelSettings

#: the other tool's values of background, IMS, cristae and matrix
THEIRS = (7, 3, 5, 1)
THEIRS_MAP = "background=7,ims=3,cristae=5,matrix=1"


def ome_zarr_writer():
    """ome-zarr-py's writer module (its import warns about its own deprecated Scaler)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr import writer
    return writer


def probabilities(truth: np.ndarray, degraded: np.ndarray) -> np.ndarray:
    """Class probabilities ``(4, z, y, x)`` float32 of a confident tool: 0.997 for the true class
    in clear areas, 0.4 (the rest spread evenly) in degraded ones."""
    p_true = np.where(degraded, 0.4, 0.997).astype(np.float32)
    p = np.repeat(((1 - p_true) / 3)[None], 4, axis=0)
    for k in range(4):
        p[k][truth == k] = p_true[truth == k]
    return p


@pytest.fixture(scope="module")
def byo_phantom(small_phantom, tmp_path_factory) -> Path:
    """The small phantom plus what another tool wrote with ome-zarr-py: ``theirs`` (the ground
    truth in the values :data:`THEIRS`, uint16, its own chunks and two levels) and ``scores``
    (per-class probabilities, c z y x float32)."""
    path = tmp_path_factory.mktemp("byo") / "byo.ome.zarr"
    shutil.copytree(small_phantom, path)
    root = zarr.open_group(path, mode="r+")
    truth = root["labels/ground-truth/s0"][:]
    degraded = root["labels/degraded/s0"][:].astype(bool)
    writer = ome_zarr_writer()
    writer.write_labels(np.asarray(THEIRS, dtype=np.uint16)[truth], root, name="theirs",
                        axes="zyx", scaler=None, scale_factors=(2,),
                        storage_options={"chunks": (8, 48, 64)})
    writer.write_image(probabilities(truth, degraded), root.create_group("scores"),
                       axes="czyx", scale_factors=None, storage_options={"chunks": (4, 8, 64, 64)})
    return path


# ---------------------------------------------------------------- the class map


def test_class_maps_parse_to_one_canonical_form():
    assert parse_class_map(IDENTITY_MAP) == ((0,), (1,), (2,), (3,))
    table = parse_class_map(" Matrix=1, ims=3,background=7+0 ,cristae=5")
    assert table == ((7, 0), (3,), (5,), (1,))
    assert format_class_map(table) == "background=7+0,ims=3,cristae=5,matrix=1"
    assert LabelSettings("t", "matrix=1,ims=3,background=7,cristae=5").class_map == THEIRS_MAP


@pytest.mark.parametrize("text, says", [
    ("background=0,ims=1,cristae=2", "no value for matrix"),
    ("background=0,ims=1,cristae=2,matrix=3,nucleus=4", "unknown class 'nucleus'"),
    ("background=0,ims=1,ims=2,matrix=3", "ims is named twice"),
    ("background=0,ims=1,cristae=1,matrix=3", "value 1 is given to ims and cristae"),
    ("background=0,ims=one,cristae=2,matrix=3", "values must be integers"),
    ("background,ims=1,cristae=2,matrix=3", "is not CLASS=VALUE"),
])
def test_bad_class_maps_are_refused_naming_the_flag(text, says, tmp_path, capsys):
    with pytest.raises(SettingsError, match=says) as err:
        LabelSettings("theirs", text)
    assert err.value.field == "class_map"
    # through the command line: one line, exit 2, before any image is opened
    assert main(["refine", str(tmp_path / "none.ome.zarr"), "--labels", "theirs",
                 "--class-map", text]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "--class-map" in out and says in out, out


def test_values_outside_the_map_or_the_dtype_are_refused():
    table = parse_class_map(THEIRS_MAP)
    values = np.array([[7, 3], [5, 1]], dtype=np.uint16)
    np.testing.assert_array_equal(to_classes(values, table), [[0, 1], [2, 3]])
    with pytest.raises(UnmappedLabelError, match="value.s. 4, 9 .* background=0.4"):
        to_classes(np.array([7, 4, 9, 9], dtype=np.uint16), table, "labels/theirs")
    with pytest.raises(SettingsError, match=r"300 do not fit x \(uint8: 0..255\)"):
        check_fits(parse_class_map("background=0,ims=1,cristae=2,matrix=300"), np.uint8, "x")
    with pytest.raises(SettingsError, match="integers"):
        check_fits(table, np.float32, "x")


def test_uncertainty_from_entropy_or_probabilities():
    q = np.array([0, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(to_uncertainty(q), q.astype(np.float32) / np.float32(255))
    f = np.array([-0.5, 0.25, 1.5, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(to_uncertainty(f), [0.0, 0.25, 1.0, 0.0])
    p = np.array([[1.0, 0.25, 0.0], [0.0, 0.25, 0.0], [0.0, 0.25, 0.0], [0.0, 0.25, 0.0]])
    np.testing.assert_allclose(to_uncertainty(p, channel_axis=0), [0.0, 1.0, 0.0], atol=1e-6)
    # integer scores that do not sum to 1 are normalised per voxel
    np.testing.assert_allclose(normalised_entropy(np.array([[200], [200]])), [1.0])


def test_label_options_go_with_labels(tmp_path, capsys):
    for args, flag in ((["--class-map", THEIRS_MAP], "--class-map"),
                       (["--uncertainty", "scores"], "--uncertainty"),
                       (["--labels", "a/b"], "--labels")):
        assert main(["refine", str(tmp_path / "none.ome.zarr"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"Invalid value for {flag}" in err, err


# ---------------------------------------------------------------- refine


def refine(image: Path, out: Path, models, *args: str) -> int:
    return main(["-q", "refine", str(image), "--output", str(out), "--workers", "0",
                 *cli_tiny(models), *args])


def test_volrefs_own_labels_through_the_options_give_plain_refines_bytes(reference, small_phantom,
                                                                        models, tmp_path):
    ref_out, _, _ = reference  # segment + plain refine (+ instances, measure) of the phantom
    out = tmp_path / "own.zarr"
    shutil.copytree(ref_out, out)
    root = zarr.open_group(out, mode="r+")
    root["labels/volref-refined/s0"][:] = 9  # must be rewritten
    assert refine(small_phantom, out, models, "--labels", "volref-initial", "--class-map",
                  IDENTITY_MAP, "--overwrite") == 0
    record = json.loads((out / "volref/provenance.json").read_text())["refine"]
    assert record["labels"] == LabelSettings("volref-initial").to_dict()
    want, got = zarr.open_group(ref_out, mode="r"), zarr.open_group(out, mode="r")
    with warnings.catch_warnings():  # the parquet files beside the arrays are not zarr nodes
        warnings.filterwarnings("ignore", message=".*not recognized as a component.*")
        arrays = [p for p, node in want.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert set(OUTPUTS) <= set(arrays)
    for path in arrays:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_array_equal(got[path][:], want[path][:], err_msg=path)


def test_another_tools_four_classes_are_refined_through_a_class_map(byo_phantom, models,
                                                                    tmp_path, capsys):
    theirs, truth = tmp_path / "theirs.zarr", tmp_path / "truth.zarr"
    assert refine(byo_phantom, theirs, models, "--labels", "theirs", "--class-map", THEIRS_MAP,
                  "--uncertainty", "scores") == 0
    # the same classes stored as volref's own values: the same refinement, byte for byte
    assert refine(byo_phantom, truth, models, "--labels", "ground-truth",
                  "--uncertainty", "scores") == 0
    src = zarr.open_group(byo_phantom, mode="r")
    got = zarr.open_group(theirs, mode="r")["labels/volref-refined/s0"][:]
    np.testing.assert_array_equal(got, zarr.open_group(truth, mode="r")[
        "labels/volref-refined/s0"][:])
    # the refiner rebuilt uncertain (degraded) places and left the confident ones alone
    classes = src["labels/ground-truth/s0"][:]
    degraded = src["labels/degraded/s0"][:].astype(bool)
    changed = got != classes
    assert got.max() <= 3 and changed.sum() > 100
    assert changed[degraded].mean() > 50 * max(changed[~degraded].mean(), 1e-6)
    # measure compares the refined labels with what refine refined: the same table for both
    tables = []
    for out in (theirs, truth):
        assert main(["-q", "measure", str(byo_phantom), "--output", str(out), "--workers", "0"]
                    ) == 0
        tables.append(pd.read_parquet(out / "volref/metrics.parquet"))
    assert len(tables[0]) > 0 and "initial_skeleton_cycles" in tables[0]
    pd.testing.assert_frame_equal(tables[0], tables[1])
    # a different map never resumes the other's output
    capsys.readouterr()
    assert refine(byo_phantom, theirs, models, "--labels", "theirs", "--uncertainty", "scores",
                  "--class-map", "background=7,ims=1,cristae=5,matrix=3") == 2
    assert "--overwrite" in capsys.readouterr().err
    # values the map does not name: refused before any block, naming them
    assert refine(byo_phantom, tmp_path / "bad.zarr", models, "--labels", "theirs",
                  "--class-map", "background=7,ims=3,cristae=2,matrix=1",
                  "--uncertainty", "scores") == 2
    assert "value(s) 5 that the class map" in capsys.readouterr().err


def test_without_an_uncertainty_refine_says_which_command_makes_one(byo_phantom, models,
                                                                    tmp_path, capsys):
    assert refine(byo_phantom, tmp_path / "o.zarr", models, "--labels", "theirs",
                  "--class-map", THEIRS_MAP) == 2
    err = capsys.readouterr().err
    assert f"volref segment {byo_phantom}" in err and "--uncertainty PATH" in err, err
    # the CRF refines the ensemble's own probabilities: not another tool's labels
    assert refine(byo_phantom, tmp_path / "o.zarr", models, "--labels", "theirs",
                  "--class-map", THEIRS_MAP, "--uncertainty", "scores", "--method", "crf") == 2
    assert "--method crf refines the probabilities" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()  # a refused command leaves no output store


def test_check_uncertainty_refuses_what_clipping_would_hide():
    ok = np.array([0.0, 0.5, 1.0 + 1e-7], dtype=np.float32)  # rounding is clipped, not refused
    check_uncertainty(ok, "u")
    check_uncertainty(np.array([0, 255], dtype=np.uint8), "u")
    check_uncertainty(np.array([[200], [3]], dtype=np.int32), "p", probabilities=True)  # scores
    for bad, needle in ((np.array([0.5, np.nan], dtype=np.float32), "NaN or Inf values"),
                        (np.array([0.5, np.inf], dtype=np.float64), "NaN or Inf"),
                        (np.full(3, 7.0, dtype=np.float32), "from 7 to 7"),
                        (np.array([-0.5, 0.5], dtype=np.float32), "from -0.5 to 0.5"),
                        (np.array([1, 2], dtype=np.int16), "int16")):
        with pytest.raises(ImageDataError, match=re.escape(needle)):
            check_uncertainty(bad, "u")
    with pytest.raises(ImageDataError, match="per-class probabilities must lie in"):
        check_uncertainty(np.full((4, 2), 1.5, dtype=np.float32), "p", probabilities=True)


@pytest.mark.parametrize("case", ["NaN", "7.0 everywhere", "int16", "probabilities above 1",
                                  "NaN only in the finest level"])
def test_a_bad_uncertainty_is_refused_naming_it(byo_phantom, models, tmp_path, capsys, case):
    """``--uncertainty`` another tool wrote is checked: NaN, values outside [0, 1] or a dtype
    volref cannot read are one line naming the image, exit 2, nothing left behind — before any
    block on the coarsest level, and by each block for what only the finest level shows."""
    image = tmp_path / "byo.ome.zarr"
    shutil.copytree(byo_phantom, image)
    shape = zarr.open_group(image, mode="r")["s0"].shape[-3:]
    data = np.full(shape, 0.25, dtype=np.float32)
    axes, levels = "zyx", None
    if case in ("NaN", "NaN only in the finest level"):
        data[9, 100, 150] = np.nan
    elif case == "7.0 everywhere":
        data[:] = 7.0
    elif case == "int16":
        data = data.astype(np.int16)
    elif case == "probabilities above 1":
        data, axes = np.full((4, *shape), 1.5, dtype=np.float32), "czyx"
    if case == "NaN only in the finest level":
        levels = (2,)
    group = zarr.open_group(image, mode="r+").create_group("bad")
    ome_zarr_writer().write_image(data, group, axes=axes, scale_factors=levels)
    if levels:  # a coarsest level that hides the NaN (as a nearest-neighbour pyramid may)
        coarse = group[sorted(group.array_keys())[-1]]
        coarse[:] = np.float32(0.25)
    before = tree_digest(image)
    out = tmp_path / "o.zarr"
    assert refine(image, out, models, "--labels", "theirs", "--class-map", THEIRS_MAP,
                  "--uncertainty", "bad") == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bad" in lines[0], err
    assert {"NaN": "NaN or Inf values", "7.0 everywhere": "from 7 to 7",
            "int16": "int16 values", "probabilities above 1": "per-class probabilities",
            "NaN only in the finest level": "NaN or Inf"}[case] in lines[0], err
    # the block that read it refused: the run's one line is its refusal
    assert lines[0].startswith("volref: error: refine: ") == (case == "NaN only in the finest level")
    assert not out.exists()
    assert tree_digest(image) == before


def test_a_refused_refine_leaves_no_new_store_nor_its_parents(byo_phantom, models, tmp_path,
                                                              capsys):
    out = tmp_path / "new" / "deeper" / "o.zarr"
    # without -q too: the refusal is the one line on stderr (no "cluster: ..." line before it)
    assert main(["refine", str(byo_phantom), "--output", str(out), "--workers", "0",
                 *cli_tiny(models), "--labels", "nothere", "--class-map", THEIRS_MAP,
                 "--uncertainty", "scores"]) == 2
    err = capsys.readouterr().err
    assert "nothere" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new").exists()
    # a folder that was there before is the user's: only the new store goes
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("mine")
    assert refine(byo_phantom, tmp_path / "kept" / "o.zarr", models, "--labels", "theirs",
                  "--class-map", THEIRS_MAP) == 2
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------- train refiner


def test_training_data_are_the_mapped_labels_and_their_uncertainty(byo_phantom):
    from volref.train.data import load_predictions

    labels, unc = load_predictions(byo_phantom, LabelSettings("theirs", THEIRS_MAP, "scores"))
    src = zarr.open_group(byo_phantom, mode="r")
    truth = src["labels/ground-truth/s0"][:]
    np.testing.assert_array_equal(labels, truth)
    want = normalised_entropy(probabilities(truth, src["labels/degraded/s0"][:].astype(bool)))
    np.testing.assert_array_equal(unc, want)


def test_train_refiner_on_another_tools_labels_lowers_the_loss(byo_phantom, tmp_path,
                                                               monkeypatch):
    import volref.models.mae

    # the command as a user runs it, with a tiny MAE (64-px tiles for the 64-px crops)
    monkeypatch.setattr(volref.models.mae, "MAEConfig", lambda image_depth=0: dataclasses.replace(
        TINY_MAE, tile=64, image_depth=image_depth))
    out = tmp_path / "mae"
    assert main(["-q", "train", "refiner", "--data", str(byo_phantom), "--out", str(out),
                 "--labels", "theirs", "--class-map", THEIRS_MAP, "--uncertainty", "scores",
                 "--epochs", "4", "--steps", "16", "--batch", "8", "--lr", "2e-3"]) == 0
    card = json.loads((out / "refiner.json").read_text())
    assert card["config"]["width"] == TINY_MAE.width
    losses = card["card"]["loss_per_epoch"]
    assert len(losses) == 4 and losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert card["card"]["labels"] == LabelSettings("theirs", THEIRS_MAP, "scores").to_dict()
