"""The fused refinement: the ensemble's and the MAE's probabilities combined where the MAE
rebuilds (volref.models.fusion, volref.train.fusion, ``--method fused``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers import INLINE, tiny
from volref.engine.cluster import ClusterSpec
from volref.errors import ConfigError
from volref.models.fusion import Fusion, read_fusion, save_fusion
from volref.models.registry import file_hash
from volref.pipeline.run import run
from volref.train.fusion import fit_fusion


def _probabilities(rng: np.random.Generator, n: int, c: int = 4) -> np.ndarray:
    p = rng.dirichlet(np.ones(c), size=n).T.astype(np.float32)
    return p


#: leans on the MAE and towards the mitochondrion: results differ from both inputs' argmax
LEANING = Fusion(weights=((0.5, 0, 0, 0), (0, 0.5, 0, 0), (0, 0, 0.5, 0), (0, 0, 0, 0.5),
                          (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)),
                 bias=(-0.5, 0.0, 0.0, 0.0))


def test_identity_fusion_is_the_ensembles_argmax_and_pixels_do_not_depend_on_each_other():
    rng = np.random.default_rng(0)
    ens, mae = _probabilities(rng, 5000), _probabilities(rng, 5000)
    assert (Fusion.identity(4).classes(ens, mae) == ens.argmax(axis=0)).all()
    whole = LEANING.classes(ens, mae)
    parts = np.concatenate([LEANING.classes(ens[:, i:i + 7], mae[:, i:i + 7])
                            for i in range(0, 5000, 7)])
    assert whole.dtype == np.uint8 and (whole == parts).all()  # any block cut: same bytes
    assert (whole != ens.argmax(axis=0)).any() and (whole != mae.argmax(axis=0)).any()


def test_fit_learns_what_the_ensemble_misses():
    """Truth follows the MAE where the ensemble is unsure: the fit must move towards the MAE and
    classify better than the ensemble alone."""
    rng = np.random.default_rng(1)
    n = 20000
    truth = rng.integers(0, 4, n)
    onehot = np.eye(4, dtype=np.float32)[truth].T
    ens = 0.3 * onehot + 0.7 * _probabilities(rng, n)  # weakly informative
    mae = 0.7 * onehot + 0.3 * _probabilities(rng, n)  # strongly informative
    fusion, record = fit_fusion([ens[:, :n // 2], ens[:, n // 2:]],
                                [mae[:, :n // 2], mae[:, n // 2:]],
                                [truth[:n // 2], truth[n // 2:]], 4)
    assert record["loss"] < record["loss_start"] and record["pixels"] == list(np.bincount(truth))
    acc_ens = (ens.argmax(axis=0) == truth).mean()
    acc_fused = (fusion.classes(ens, mae) == truth).mean()
    assert acc_fused > acc_ens + 0.1
    with pytest.raises(ValueError, match="same number"):
        fit_fusion([ens], [mae], [truth[:10]], 4)


def test_fusion_file_round_trip_and_refusals(tmp_path):
    path = save_fusion(tmp_path / "f.json", LEANING, {"segmenter_sha256": "a"})
    fusion, card = read_fusion(path)
    assert fusion == LEANING and card == {"segmenter_sha256": "a"}
    bad = tmp_path / "bad.json"
    for text in ("not json", json.dumps({"kind": "other"}),
                 json.dumps({"kind": "volref-fusion", "fusion": {"weights": [[1]], "bias": [0]}})):
        bad.write_text(text)
        with pytest.raises(ValueError, match="not a volref fusion"):
            read_fusion(bad)
    with pytest.raises(ValueError, match="finite"):
        Fusion(weights=LEANING.weights, bias=(float("nan"), 0.0, 0.0, 0.0))


@pytest.fixture()
def fused_files(models, tmp_path):
    seg, mae = models
    path = tmp_path / "fusion.json"
    save_fusion(path, LEANING, {"segmenter_sha256": file_hash(seg),
                                "refiner_sha256": file_hash(mae)})
    return str(path)


def test_fused_refinement_same_bytes_for_any_block_shape_and_worker_count(reference, small_phantom, models,
                                                         fused_files, tmp_path):
    out, _, expected = reference
    refined = []
    for shape, cluster in (((8, 64, 128), INLINE), ((16, 192, 256), ClusterSpec(workers=2))):
        store = tmp_path / f"{shape[0]}.zarr"
        shutil.copytree(out, store)
        settings = tiny(models, method="fused", block_shape=shape, overwrite=True,
                        fusion=fused_files)
        run(small_phantom, output=store, stages=("refine",), settings=settings, cluster=cluster)
        root = zarr.open_group(store, mode="r")
        refined.append(root["labels/volref-refined/s0"][:])
        provenance = root["volref"].attrs["volref"]["provenance"]["refine"]
        assert provenance["method"] == "fused" and provenance["fusion"] == LEANING.to_dict()
    np.testing.assert_array_equal(refined[0], refined[1])
    initial, mae = expected["labels/volref-initial/s0"], expected["labels/volref-refined/s0"]
    # it acts (differently from the MAE) and only where the ensemble was unsure
    assert (refined[0] != initial).any() and (refined[0] != mae).any()
    assert not ((refined[0] != initial) & (expected["volref/uncertainty/s0"] == 0)).any()


def test_fused_refuses_a_fusion_fitted_for_other_models(reference, small_phantom, models,
                                                        tmp_path):
    out, _, _ = reference
    store = tmp_path / "s.zarr"
    shutil.copytree(out, store)
    other = save_fusion(tmp_path / "other.json", LEANING, {"segmenter_sha256": "0" * 64})
    settings = dataclasses.replace(tiny(models, method="fused", overwrite=True),
                                   fusion=str(other))
    with pytest.raises(ConfigError, match="fitted for another ensemble"):
        run(small_phantom, output=store, stages=("refine",), settings=settings, cluster=INLINE)


def test_ensemble_probabilities_of_some_tiles_equal_those_of_all(models):
    from volref.models.registry import load_segmenter
    from volref.stages.segment import SegmentSettings, segment_probabilities

    ens = load_segmenter(models[0])
    settings = SegmentSettings(tile=64, halo=16)
    stack = np.random.default_rng(2).random((4, 128 + 32, 192 + 32), dtype=np.float32)
    full = segment_probabilities(ens, stack, settings)
    needed = np.zeros((2, 2, 3), bool)
    needed[0, 1, 2] = needed[1, 0, 0] = True
    some = segment_probabilities(ens, stack, settings, needed=needed)
    for z, ty, tx in np.argwhere(needed):
        win = (z, slice(None), slice(64 * ty, 64 * ty + 64), slice(64 * tx, 64 * tx + 64))
        np.testing.assert_array_equal(some[win], full[win])
    assert np.count_nonzero(some.sum(axis=1)) == 2 * 64 * 64  # the other tiles were not run


def test_default_is_fused_where_the_fusion_fits_the_models_else_the_mae(models, fused_files,
                                                                        caplog):
    from volref.pipeline.refine import RefineStage, default_method

    seg, mae = models
    default_method.cache_clear()  # decided once per process and models
    assert RefineStage(model=mae, segmenter=seg, fusion=fused_files).chosen == "fused"
    assert RefineStage(model=mae, segmenter=seg, method="mae", fusion=fused_files).chosen == "mae"
    with caplog.at_level("WARNING"):  # the shipped fusion was fitted for the shipped models
        assert RefineStage(model=mae, segmenter=seg).chosen == "mae"
    assert "fitted for another ensemble" in caplog.text
    assert RefineStage().chosen == "fused"  # the shipped models and fusion


#: sha256 of the shipped MAE's labels for the region below, made by the code before ``fused``
#: existed (commit 0de97d2): ``--method mae`` must keep giving these bytes
PAPER_MAE_SHA256 = "7a9c05843e245e0a66ac0dadfb666627e77727ce115dd02ddbe88d81fa589baa"


def test_paper_mae_gives_the_same_bytes_as_before_fused_existed():
    import hashlib

    import torch

    from volref.models.registry import load_refiner
    from volref.stages.refine import RefineSettings, context, refine_region

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = RefineSettings(precision="fp32")
        c = context(settings, 4)
        yy, xx = np.mgrid[0:128, 0:128]
        r = np.hypot(yy - 64, (xx - 64) / 1.6)  # an elliptic mitochondrion with one crista
        lab = np.zeros((128, 128), np.uint8)
        lab[r < 40] = 1
        lab[r < 34] = 3
        lab[(r < 30) & (np.abs(yy - 64) < 3)] = 2
        unc = np.zeros((128, 128), np.float32)
        unc[50:80, 20:60] = 0.9  # a low-SNR spot over one end
        seen = []

        def argmax(z, sel, p):
            seen.append(p)
            return p.argmax(axis=0)

        plain = refine_region(load_refiner(), np.pad(lab, c)[None], np.pad(unc, c)[None],
                              settings).labels
        hooked = refine_region(load_refiner(), np.pad(lab, c)[None], np.pad(unc, c)[None],
                               settings, combine=argmax).labels
    finally:
        torch.set_num_threads(threads)
    assert hashlib.sha256(plain.tobytes()).hexdigest() == PAPER_MAE_SHA256
    assert (plain == hooked).all() and (plain != lab).sum() > 100
    # no near-tie a CPU's last bits could flip: the bytes are the machine's, not luck
    top2 = np.sort(seen[0], axis=0)[-2:]
    assert (top2[1] - top2[0]).min() > 1e-3


# ---------------------------------------------------------------- topology: smoothing, rim


def test_smoothing_keeps_to_the_ensembles_tiles_so_any_cut_gives_the_same_values():
    from volref.models.fusion import smooth_tiles

    rng = np.random.default_rng(3)
    p = rng.random((2, 4, 96, 160)).astype(np.float32)  # (z, C, Y, X); tiles of 32, volume 90x150
    whole = smooth_tiles(p, 2.0, 32, extent=(90, 150))
    assert not np.allclose(whole, p)
    # a block of the volume (on the tile grid) smooths its tiles to the same values
    part = smooth_tiles(p[:, :, 32:96, 64:160], 2.0, 32, origin=(32, 64), extent=(90, 150))
    np.testing.assert_array_equal(part, whole[:, :, 32:96, 64:160])
    # a tile's values depend on that tile alone; past the volume nothing is read
    other = p.copy()
    other[:, :, :32, :32] += 1.0
    other[:, :, 90:, :] = 7.0
    again = smooth_tiles(other, 2.0, 32, extent=(90, 150))
    np.testing.assert_array_equal(again[:, :, 32:90], whole[:, :, 32:90])
    np.testing.assert_array_equal(again[:, :, :32, 32:], whole[:, :, :32, 32:])
    # tiles not needed are left as they were; sigma 0 smooths nothing
    needed = np.zeros((2, 3, 5), bool)
    needed[1, 0, 0] = True
    some = smooth_tiles(p, 2.0, 32, needed=needed)
    np.testing.assert_array_equal(some[0], p[0])
    assert not np.allclose(some[1, :, :32, :32], p[1, :, :32, :32])
    np.testing.assert_array_equal(some[1, :, 32:], p[1, :, 32:])
    np.testing.assert_array_equal(smooth_tiles(p, 0.0, 32), p)


def test_fused_classes_take_the_outline_from_the_smoothed_and_cristae_from_the_raw():
    from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX

    plain = dataclasses.replace(Fusion.identity(4), smooth=2.0)
    raw = np.array([[0.1, 0.1, 0.2, 0.6], [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.2, 0.6],
                    [0.7, 0.1, 0.05, 0.15]], np.float32).T  # (C, 4 pixels)
    smooth = np.array([[0.1, 0.1, 0.6, 0.2], [0.6, 0.2, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1],
                       [0.1, 0.1, 0.1, 0.7]], np.float32).T
    mae = np.full((4, 4), 0.25, np.float32)
    assert list(plain.classes(raw, mae)) == [MATRIX, CRISTAE, MATRIX, BACKGROUND]
    assert list(plain.classes(raw, mae, smooth)) == [MATRIX, BACKGROUND, IMS, MATRIX]


def test_fusion_files_without_the_topology_keys_keep_the_per_pixel_rule():
    d = LEANING.to_dict()
    assert d["smooth"] == 2.0 and d["rim"] is True  # what a fusion made now does
    old = {k: v for k, v in d.items() if k not in ("smooth", "rim")}
    assert Fusion.from_dict(old) == dataclasses.replace(LEANING, smooth=0.0, rim=False)
    with pytest.raises(ValueError, match="smooth"):
        dataclasses.replace(LEANING, smooth=float("inf"))
    shipped, _ = read_fusion(Path(__file__).parents[1] / "volref/models/weights/fusion.json")
    assert shipped.smooth == 2.0 and shipped.rim


def test_rim_turns_rebuilt_inner_structure_beside_background_into_ims_the_same_for_any_cut():
    from volref.classes import BACKGROUND, IMS, MATRIX
    from volref.stages.refine import rim

    c, cell = 2, 8
    region = np.full((16 + 2 * c, 16 + 2 * c), MATRIX, np.uint8)  # initial labels, with context
    region[:, :c + 1] = BACKGROUND  # kept background along the left
    removed = np.zeros(region.shape, bool)
    removed[c:c + 16, c + 1:c + 16] = True  # the core's pixels right of it were removed
    labels = region[c:c + 16, c:c + 16].copy()
    labels[:, 5] = BACKGROUND  # rebuilt background: column 5 (cell 0) ...
    labels[:, 8] = BACKGROUND  # ... and column 8 (cell 1)
    rebuilt = removed[c:c + 16, c:c + 16]
    out = rim(labels, rebuilt, region, removed, c, cell)
    assert (out[:, 1] == IMS).all()  # beside kept background
    assert (out[:, 4] == IMS).all() and (out[:, 6] == IMS).all()  # beside background of its cell
    assert (out[:, 7] == MATRIX).all()  # column 8's background is another cell's: not seen
    assert (out[:, 9] == IMS).all()
    assert (out[:, 2:4] == MATRIX).all() and (out[:, 10:] == MATRIX).all()
    # unremoved pixels never change
    assert (rim(labels, np.zeros_like(rebuilt), region, removed, c, cell) == labels).all()
    # the right half on its own (a block cut on the cell grid) gives the same pixels
    right = rim(labels[:, 8:], rebuilt[:, 8:], region[:, 8:], removed[:, 8:], c, cell)
    np.testing.assert_array_equal(right, out[:, 8:])


def test_enclosed_rebuilt_holes_become_inner_structure_the_same_for_any_cut():
    from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
    from volref.stages.refine import fill_enclosed

    c, cell = 2, 8
    region = np.full((16 + 2 * c, 24 + 2 * c), MATRIX, np.uint8)  # initial labels, with context
    removed = np.zeros(region.shape, bool)
    removed[c:c + 16, c:c + 24] = True  # every core pixel was removed and rebuilt
    labels = np.full((16, 24), MATRIX, np.uint8)
    rebuilt = np.ones(labels.shape, bool)
    labels[2:4, 2:4] = IMS  # a hole inside cell (0, 0): filled
    labels[2:4, 10:12] = BACKGROUND  # cell (0, 1), ringed by cristae: filled with cristae
    labels[1, 10:12] = labels[4, 10:12] = labels[2:4, 9] = labels[2:4, 12] = CRISTAE
    labels[10:12, 7] = IMS  # beside cell (1, 1), whose pixels were rebuilt too: left alone
    labels[10:12, 16:18] = IMS  # a hole with one pixel that was not rebuilt: left alone
    rebuilt[10, 16] = False
    labels[5:7, 20:22] = IMS  # inside cell (0, 2): filled
    labels[7:9, 4:6] = IMS  # across cells (0, 0) and (1, 0): left alone
    out = fill_enclosed(labels, rebuilt, region, removed, c, cell)
    assert (out[2:4, 2:4] == MATRIX).all()
    assert (out[2:4, 10:12] == CRISTAE).all()
    assert (out[10:12, 7] == IMS).all()
    assert (out[10:12, 16:18] == IMS).all()
    assert (out[5:7, 20:22] == MATRIX).all()
    assert (out[7:9, 4:6] == IMS).all()
    # a hole at the core's edge is enclosed only by what was not removed past it
    edge = labels.copy()
    edge[:2, 12:14] = IMS
    assert (fill_enclosed(edge, rebuilt, region, removed, c, cell)[:2, 12:14] == MATRIX).all()
    removed_above = removed.copy()
    removed_above[:c, :] = True  # rebuilt by the block above: unknown here
    assert (fill_enclosed(edge, rebuilt, region, removed_above, c, cell)[:2, 12:14] == IMS).all()
    # nothing rebuilt: nothing changes; a block cut on the cell grid gives the same pixels
    assert (fill_enclosed(labels, np.zeros_like(rebuilt), region, removed, c, cell)
            == labels).all()
    right = fill_enclosed(labels[:, 8:], rebuilt[:, 8:], region[:, 8:], removed[:, 8:], c, cell)
    np.testing.assert_array_equal(right, out[:, 8:])
    bottom = fill_enclosed(labels[8:], rebuilt[8:], region[8:], removed[8:], c, cell)
    np.testing.assert_array_equal(bottom, out[8:])


def test_train_fusion_writes_the_outline_settings_it_is_given(tmp_path):
    """``volref train fusion`` end to end on a small segmented phantom (shipped models): the
    fitted file refines (its card names both models) and carries --smooth and --rim."""
    from benchmarks.common import quick_store
    from volref.cli.main import main
    from volref.models.registry import DEFAULT_REFINER, DEFAULT_SEGMENTER

    store = quick_store(tmp_path)
    out = tmp_path / "fusion.json"
    assert main(["train", "fusion", "--data", str(store), "--out", str(out), "--every", "4",
                 "--smooth", "1.5", "--no-rim"]) == 0
    fusion, card = read_fusion(out)
    assert fusion.smooth == 1.5 and fusion.rim is False
    assert card["segmenter_sha256"] == file_hash(DEFAULT_SEGMENTER)
    assert card["refiner_sha256"] == file_hash(DEFAULT_REFINER)
    assert sum(card["fit"]["pixels"]) > 0


def test_bad_outline_settings_and_a_broken_named_fusion_are_refused_in_one_line(
        models, tmp_path, capsys):
    from volref.cli.main import main
    from volref.pipeline.refine import RefineStage, default_method

    d = LEANING.to_dict()
    for key, bad in (("rim", "false"), ("rim", 1), ("smooth", "2"), ("smooth", True),
                     ("smooth", -1.0), ("smooth", float("nan"))):
        with pytest.raises(ValueError, match=key):
            Fusion.from_dict({**d, key: bad})
    # a fusion file the user names and volref cannot use: an error, not a quiet switch to mae
    seg, mae = models
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    default_method.cache_clear()
    for path in (broken, tmp_path / "missing.json"):
        with pytest.raises(ConfigError, match="not a volref fusion file"):
            RefineStage(model=mae, segmenter=seg, fusion=str(path)).chosen  # noqa: B018
    # volref train fusion refuses a NaN smoothing before it fits anything
    assert main(["train", "fusion", "--data", str(tmp_path / "none.ome.zarr"), "--out",
                 str(tmp_path / "f.json"), "--smooth", "nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("volref: error: smooth must lie in") and "\n" not in err
    assert not (tmp_path / "f.json").exists()
