"""The fused refinement: the ensemble's and the MAE's probabilities combined where the MAE
rebuilds (volref.models.fusion, volref.train.fusion, ``--method fused``)."""

from __future__ import annotations

import dataclasses
import json
import shutil

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
