"""The paper's baselines (dense CRF, CNN-AE, MAE+X) and the Table 2 selection rule, on CPU."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.helpers import TINY_MAE
from volref.classes import BACKGROUND, CRISTAE, IMS, MATRIX
from volref.errors import VolrefError
from volref.evaluate.table2 import (
    MIN_CONTROL,
    SliceData,
    Table2Settings,
    breaks_rule,
    control_warnings,
    degraded_dice,
    select,
    summarise,
    to_markdown,
    verdict,
)
from volref.metrics import METRICS, tile_metrics
from volref.models.cnnae import CNNAEConfig, CNNAutoencoder
from volref.models.mae import MaskedAutoencoder
from volref.models.registry import load_refiner, refiner_method
from volref.stages.crf import CRFSettings, crf_labels, crf_probabilities
from volref.stages.refine import RefineSettings, context, refine_region

TINY_CNNAE = CNNAEConfig(tile=32, width=8, levels=2, bottleneck=8)


def _mito(shape=(64, 64), centre=(32, 32), r=(20, 12)) -> np.ndarray:
    """An elliptical mitochondrion: IMS rim, matrix, a cristae bar."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    d = ((yy - centre[0]) / r[0]) ** 2 + ((xx - centre[1]) / r[1]) ** 2
    lab = np.zeros(shape, np.uint8)
    lab[d <= 1] = IMS
    lab[d <= 0.7] = MATRIX
    lab[(d <= 0.7) & (np.abs(yy - centre[0]) <= 1)] = CRISTAE
    return lab


# ---------------------------------------------------------------- dense CRF


def test_crf_keeps_confident_labels_and_follows_the_image_where_unsure():
    lab = _mito()
    probs = np.full((4,) + lab.shape, 0.02, np.float32)
    for c in range(4):
        probs[c][lab == c] = 0.94
    image = (lab != BACKGROUND).astype(np.float32)  # bright mitochondrion on dark background
    assert (crf_labels(probs, image) == lab).mean() > 0.97
    # a band of the mitochondrion made unsure (uniform): the CRF fills it from its neighbours
    # of the same intensity, not with background
    unsure = probs.copy()
    unsure[:, 10:22, :] = 0.25
    out = crf_labels(unsure, image)
    band = (slice(10, 22), slice(None))
    assert (out[band] != BACKGROUND)[lab[band] != BACKGROUND].mean() > 0.9
    q = crf_probabilities(unsure, image)
    assert q.shape == probs.shape and np.allclose(q.sum(0), 1.0, atol=1e-4)


def test_crf_refuses_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="iteration"):
        CRFSettings(iterations=0)
    with pytest.raises(ValueError, match="differ"):
        crf_labels(np.full((4, 8, 8), 0.25, np.float32), np.zeros((8, 9), np.float32))


# ---------------------------------------------------------------- CNN-AE and MAE+X


def test_cnnae_shapes_and_loss_on_the_whole_tile():
    torch.manual_seed(0)
    m = CNNAutoencoder(TINY_CNNAE).eval()
    labels = torch.from_numpy(_mito((32, 32), (16, 16), (10, 6))[None].repeat(2, 0))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :20] = True
    with torch.no_grad():
        logits = m(labels, mask)
    assert logits.shape == (2, 4, 32, 32)
    x = m.inputs(labels, mask)  # removed pixels: no class, the marker channel set
    assert float(x[0, :4, :4, :4].sum()) == 0 and float(x[0, 4, :4, :4].min()) == 1
    keep = torch.ones(2, 32, 32, dtype=torch.bool)
    loss = m.forward_loss(logits, labels, mask, keep, torch.ones(4))
    assert torch.isfinite(loss) and loss.item() > 0
    with pytest.raises(ValueError, match="multiple"):
        m(torch.zeros(1, 30, 30, dtype=torch.long), torch.zeros(1, 56, dtype=torch.bool))


def _region(nz=1):
    settings = RefineSettings(tile=32, stride=16, near_px=4)
    c = context(settings, 4)
    lab = np.zeros((nz, 32 + 2 * c, 32 + 2 * c), np.uint8)
    lab[:, c:c + 32, c:c + 32] = _mito((32, 32), (16, 16), (12, 8))
    unc = np.zeros(lab.shape, np.float32)
    unc[:, c + 12:c + 20, c + 4:c + 28] = 0.9
    return lab, unc, settings, c


def test_cnnae_replaces_whole_tiles_and_the_mae_only_removed_patches():
    lab, unc, settings, c = _region()
    torch.manual_seed(0)
    cnn = CNNAutoencoder(dataclasses.replace(TINY_CNNAE, tile=32)).eval()
    mae = MaskedAutoencoder(TINY_MAE).eval()
    fp32 = dataclasses.replace(settings, precision="fp32")
    by_cnn = refine_region(cnn, lab, unc, fp32)
    by_mae = refine_region(mae, lab, unc, fp32)
    core = lab[:, c:c + 32, c:c + 32]
    assert np.array_equal(by_mae.labels[~by_mae.removed], core[~by_mae.removed])
    assert by_cnn.tiles_run == by_mae.tiles_run > 0
    # an untrained autoencoder repaints pixels outside the removed patches too
    assert (by_cnn.labels[~by_cnn.removed] != core[~by_cnn.removed]).any()


def test_mae_x_starts_as_the_mae_it_was_made_from_and_needs_the_image():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TINY_MAE).eval()
    x = MaskedAutoencoder(dataclasses.replace(TINY_MAE, image_depth=1)).eval()
    missing, unexpected = x.load_state_dict(mae.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("image_") for k in missing)
    assert x.needs_image and not mae.needs_image
    labels = torch.from_numpy(_mito((32, 32), (16, 16), (10, 6))[None])
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 20:40] = True
    image = torch.rand(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(x(labels, mask, image=image), mae(labels, mask))
        with pytest.raises(ValueError, match="image"):
            x(labels, mask)
    lab, unc, settings, _ = _region()
    with pytest.raises(ValueError, match="image="):
        refine_region(x, lab, unc, settings)
    out = refine_region(x, lab, unc, dataclasses.replace(settings, precision="fp32"),
                        image=np.zeros(lab.shape, np.float32))
    ref = refine_region(mae, lab, unc, dataclasses.replace(settings, precision="fp32"))
    np.testing.assert_array_equal(out.labels, ref.labels)


def test_baseline_training_writes_loadable_models(tmp_path):
    """``volref train refiner --method cnn-ae|mae-x``: a CNN-AE from scratch; a MAE+X from a
    MAE, whose weights it keeps; the files load as their method."""
    from volref.train.refiner import RefinerRecipe, TilePool, train_refiner

    labels = np.stack([_mito((32, 32), (16, 16), (10, 6)), _mito((32, 32), (14, 18), (9, 7))])
    pool = TilePool(labels, np.zeros(labels.shape, np.float32),
                    np.random.default_rng(0).random(labels.shape).astype(np.float32))
    base = RefinerRecipe(epochs=1, steps_per_epoch=2, batch=2, crop=32, mae=TINY_MAE,
                         bf16=False)
    cnn = load_refiner(train_refiner(pool, dataclasses.replace(
        base, method="cnn-ae", cnnae=TINY_CNNAE), tmp_path / "cnn"))
    assert refiner_method(cnn) == "cnn-ae" and (tmp_path / "cnn" / "cnn-ae.json").exists()
    mae_file = train_refiner(pool, base, tmp_path / "mae")
    x_recipe = dataclasses.replace(base, method="mae-x", lr=1e-30, init=str(mae_file),
                                   mae=dataclasses.replace(TINY_MAE, image_depth=1))
    x = load_refiner(train_refiner(pool, x_recipe, tmp_path / "x"))
    assert refiner_method(x) == "mae-x"
    mae = load_refiner(mae_file)
    for k, v in mae.state_dict().items():
        torch.testing.assert_close(x.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="image_depth"):
        dataclasses.replace(base, method="mae-x")
    no_image = TilePool(pool.labels, pool.uncertainty)
    with pytest.raises(VolrefError, match="image"):
        train_refiner(no_image, x_recipe, tmp_path / "y")


# ---------------------------------------------------------------- Table 2 selection


def _slice(initial, truth, degraded) -> SliceData:
    return SliceData("s", 0, np.zeros(initial.shape, np.float32), initial,
                     np.zeros(initial.shape, np.float32), truth, degraded)


def test_table2_selects_broken_degraded_tiles_against_a_confirmed_control():
    good = _mito((64, 64), (32, 32), (24, 14))
    broken = good.copy()
    broken[good == IMS] = MATRIX  # the IMS is missing: inner structure touches background
    t = 64
    row_init = np.concatenate([good] * 4 + [broken, good], axis=1)
    row_truth = np.concatenate([good] * 6, axis=1)
    deg = np.zeros(row_init.shape, bool)
    deg[:, 4 * t:6 * t] = True  # tiles 4 (broken) and 5 (correct) are degraded
    settings = Table2Settings(tile=t, min_mito=0.1)
    implausible, control, bounds = select([_slice(row_init, row_truth, deg)], settings)
    assert [r.x for r in control] == [0, t, 2 * t, 3 * t]
    assert [r.x for r in implausible] == [4 * t]  # the correct degraded tile breaks no rule
    assert "inner_membrane_background_ratio" in breaks_rule(implausible[0].metrics, bounds)


def test_table2_summaries_dice_and_verdict():
    s = summarise([{m: 1.0 for m in METRICS}, {m: 3.0 for m in METRICS},
                   {**{m: 2.0 for m in METRICS}, "cristae_boundary_ratio": float("nan")}])
    assert s["skeleton_cycles"] == {"mean": 2.0, "sem": pytest.approx(1 / np.sqrt(3)), "n": 3}
    assert s["cristae_boundary_ratio"]["n"] == 2
    truth = np.array([[0, 1, 2, 3]], np.uint8)
    region = np.ones(truth.shape, bool)
    d = degraded_dice([(truth.copy(), truth, region)])
    assert d == {"mitochondrion": 1.0, "ims": 1.0, "cristae": 1.0, "matrix": 1.0}
    bad = degraded_dice([(np.zeros_like(truth), truth, region)])
    assert bad["mitochondrion"] == 0.0

    def row(v):
        return {m: {"mean": v, "sem": 0.0} for m in METRICS}

    methods = {"initial": row(10.0), "crf": row(6.0), "mae": row(4.0), "control": row(3.0)}
    v = verdict(methods, {"initial": d, "mae": d, "crf": bad}, method="mae")
    assert v["mae_closer_than_initial"] == 5 and v["mae_closer_than_crf"] == 5
    assert v["mae_best_dice_mitochondrion"] and v["mae_best_dice_cristae"]
    assert "truth_closer_than" not in v
    # the ground truth of the tiles can sit farther from the control than a method: the target
    # "closer than it" is then out of reach of a perfect refinement, and the verdict says so
    v = verdict({**methods, "truth": row(4.5)}, {"mae": d}, method="mae")
    assert v["truth_closer_than"] == {"initial": 5, "crf": 5, "mae": 0}


def test_table2_json_is_strict_json(tmp_path):
    import json

    from volref.evaluate.table2 import write

    row = {m: {"mean": float("nan"), "sem": np.float64(math.inf), "n": 0} for m in METRICS}
    write({"methods": {"mae": row}, "dice_degraded": {}, "bounds": (-math.inf, 1.5)}, tmp_path)
    saved = json.loads((tmp_path / "table2.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in table2.json"))
    assert saved["methods"]["mae"]["skeleton_cycles"] == {"mean": None, "sem": None, "n": 0}
    assert saved["bounds"] == [None, 1.5]


def test_table2_warns_when_the_control_group_is_too_small_to_bound_a_range():
    assert control_warnings(MIN_CONTROL) == []
    (one,) = control_warnings(1)
    assert "has 1 tile (" in one and "--degraded-fraction 0" in one
    assert "has 0 tiles" in control_warnings(0)[0]
    md = to_markdown({"methods": {}, "dice_degraded": {}, "warnings": control_warnings(1)})
    assert md.startswith("Warning: the control group has 1 tile")


# ---------------------------------------------------------------- volref refine --method


@pytest.fixture(scope="module")
def baseline_models(models, tmp_path_factory):
    from volref.models.checkpoint import save_model
    from volref.models.registry import CNNAE_KIND, REFINER_KIND

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("baselines")
    x_config = dataclasses.replace(TINY_MAE, image_depth=1)
    x = MaskedAutoencoder(x_config).eval()
    torch.nn.init.normal_(x.image_proj.weight, std=0.5)  # let the image matter
    return {"mae-x": str(save_model(d / "x.safetensors", x, REFINER_KIND, x_config.to_dict())),
            "cnn-ae": str(save_model(d / "c.safetensors", CNNAutoencoder(TINY_CNNAE).eval(),
                                     CNNAE_KIND, TINY_CNNAE.to_dict()))}


@pytest.fixture(scope="module")
def crf_crop(small_phantom, models, tmp_path_factory):
    """A 4 x 128 x 128 crop of the small phantom, segmented: the CRF recomputes the ensemble's
    probabilities under every window, which on the whole phantom took minutes."""
    import zarr

    from tests.helpers import INLINE, tiny, write_image
    from volref.pipeline.run import run

    image = tmp_path_factory.mktemp("crf") / "crop.ome.zarr"
    write_image(image, zarr.open_group(small_phantom, mode="r")["s0"][4:8, 32:160, 64:192], "zyx",
                chunks=(2, 64, 64))
    out = image.parent / "out.zarr"
    run(image, output=out, stages=("segment",), settings=tiny(models), cluster=INLINE)
    return image, out


@pytest.mark.parametrize("method", ["crf", "cnn-ae", "mae-x"])
def test_refine_method_gives_the_same_bytes_for_any_block_shape(method, reference, small_phantom,
                                                                crf_crop, models, baseline_models,
                                                                tmp_path):
    import shutil

    import zarr

    from tests.helpers import INLINE, tiny
    from volref.pipeline.run import run

    out, _, expected = reference
    image, shapes = small_phantom, ((8, 64, 128), (16, 192, 256))
    if method == "crf":
        image, out = crf_crop
        shapes = ((2, 64, 64), (4, 128, 128))
        expected = {k: zarr.open_group(out, mode="r")[k][:] for k in ("labels/volref-initial/s0",)}
    refined = []
    for shape in shapes:
        store = tmp_path / f"{shape[0]}.zarr"
        shutil.copytree(out, store)
        settings = tiny(models, method=method, block_shape=shape, overwrite=True)
        if method == "crf":  # 64-px CRF tiles: a quarter of the windows of 32-px ones
            settings = dataclasses.replace(settings, refine=RefineSettings(tile=64, stride=32,
                                                                           tau=0.3))
        else:
            settings = dataclasses.replace(settings, refiner=baseline_models[method])
        run(image, output=store, stages=("refine",), settings=settings, cluster=INLINE)
        root = zarr.open_group(store, mode="r")
        refined.append(root["labels/volref-refined/s0"][:])
        provenance = root["volref"].attrs["volref"]["provenance"]["refine"]
        assert provenance["method"] == method
    np.testing.assert_array_equal(refined[0], refined[1])
    initial = expected["labels/volref-initial/s0"]
    assert (refined[0] != initial).any()  # it did something
    if method != "crf":
        assert (refined[0] != expected["labels/volref-refined/s0"]).any()  # not the MAE's result


def test_refine_method_refuses_the_wrong_model(reference, small_phantom, models, baseline_models,
                                              tmp_path):
    import shutil

    from tests.helpers import INLINE, tiny
    from volref.errors import ConfigError
    from volref.pipeline.run import run

    out, _, _ = reference
    store = tmp_path / "s.zarr"
    shutil.copytree(out, store)
    mae_file = models[1]
    with pytest.raises(ConfigError, match="is a mae model, not cnn-ae"):
        run(small_phantom, output=store, stages=("refine",), cluster=INLINE,
            settings=tiny(models, method="cnn-ae", overwrite=True))
    other_seg = dataclasses.replace(tiny(models, method="crf", overwrite=True), segmenter=None)
    with pytest.raises(ConfigError, match="ensemble that made"):
        run(small_phantom, output=store, stages=("refine",), cluster=INLINE, settings=other_seg)
    assert mae_file  # the MAE itself still refines


def test_evaluate_table2_on_a_segmented_phantom(phantom_copy, models, tmp_path):
    """End to end on a small phantom: tiles selected, every method run, JSON shaped as the
    issue asks, figures drawn."""
    import json

    import zarr

    from tests.helpers import INLINE, tiny
    from volref.evaluate.methods import MethodSettings
    from volref.evaluate.table2 import evaluate_table2, to_markdown, write
    from volref.layout import GROUND_TRUTH, INITIAL, finest, label_path
    from volref.methods import DEFAULT_METHOD
    from volref.metrics import dice
    from volref.models.registry import load_segmenter
    from volref.pipeline.run import run
    from volref.report.evaluation import table2_bars, table2_panel

    run(phantom_copy, stages=("segment",), settings=tiny(models), cluster=INLINE)
    seg, mae = models
    settings = Table2Settings(tile=64, every=2, min_mito=0.05, min_degraded=0.05,
                              control_dice=0.0, control_class_dice=0.0, outside=(25.0, 75.0))
    ms = MethodSettings(refine=RefineSettings(tile=32, stride=16, tau=0.3))
    result, examples = evaluate_table2([phantom_copy], {"mae": load_refiner(mae)},
                                       load_segmenter(seg), methods=("crf", "mae"),
                                       settings=settings, method_settings=ms)
    assert result["tiles"]["implausible"] > 0 and result["tiles"]["control"] > 0
    assert set(result["methods"]) == {"initial", "crf", "mae", "control", "truth"}
    # the truth row: the ground truth of the implausible tiles, what a perfect refinement scores
    truth = finest(zarr.open_group(phantom_copy, mode="r"), label_path(GROUND_TRUTH))
    truth_rows = [tile_metrics(truth[t["z"], t["y"]:t["y"] + 64, t["x"]:t["x"] + 64])
                  for t in result["implausible_tiles"]]
    assert result["methods"]["truth"] == summarise(truth_rows)
    assert set(result["verdict"]["truth_closer_than"]) == {"initial", "crf", "mae"}
    assert result["warnings"] == control_warnings(result["tiles"]["control"])
    for row in result["methods"].values():
        assert set(row) == set(METRICS) and {"mean", "sem"} <= set(row["skeleton_cycles"])
    assert set(result["dice_degraded"]["mae"]) == {"mitochondrion", "ims", "cristae", "matrix"}
    assert result["default_method"] == DEFAULT_METHOD
    # Dice over the whole evaluated slices: the initial labels' as counted here from the store
    root = zarr.open_group(phantom_copy, mode="r")
    zs = range(settings.every // 2, root["s0"].shape[0], settings.every)
    ini, tru = (np.stack([finest(root, label_path(n))[z] for z in zs])
                for n in (INITIAL, GROUND_TRUTH))
    whole = result["dice_whole"]
    assert list(whole) == ["initial", "crf", "mae"]
    assert whole["initial"]["mitochondrion"] == pytest.approx(dice(ini > 0, tru > 0))
    assert whole["initial"]["cristae"] == pytest.approx(dice(ini == CRISTAE, tru == CRISTAE))
    assert whole["mae"] != whole["initial"]  # the slices were refined, not copied
    write(result, tmp_path)
    text = (tmp_path / "table2.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in table2.json"))
    assert saved["tiles"] == result["tiles"] and saved["dice_whole"] == whole
    markdown = (tmp_path / "table2.md").read_text()
    assert "\n| method |" in "\n" + markdown and "Dice over the whole evaluated slices" in markdown
    assert "| ground truth (same tiles) |" in markdown
    assert "(default)" not in markdown  # the default method was not evaluated
    assert "| mae (default) |" in to_markdown({**result, "default_method": "mae"})
    assert table2_bars(result, tmp_path / "bars.png").stat().st_size > 0
    if examples:
        assert set(examples[0]["labels"]) == {"crf", "mae"}
        assert table2_panel(examples, tmp_path / "fig6.png").stat().st_size > 0


def test_max_removed_leaves_tiles_with_too_little_context_alone():
    lab, unc, settings, c = _region()
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TINY_MAE).eval()
    fp32 = dataclasses.replace(settings, precision="fp32")
    every = refine_region(mae, lab, unc, fp32)
    none = refine_region(mae, lab, unc, dataclasses.replace(fp32, max_removed=0.01))
    assert every.tiles_run > 0 and none.tiles_run == 0
    np.testing.assert_array_equal(none.labels, lab[:, c:c + 32, c:c + 32])
    with pytest.raises(ValueError, match="max_removed"):
        RefineSettings(max_removed=0)


def test_cli_refine_with_the_shipped_cnnae_and_a_wrong_method(phantom_copy, models, capsys):
    from volref.cli.main import main
    from volref.models.registry import DEFAULT_REFINERS

    if not DEFAULT_REFINERS["cnn-ae"].exists():
        pytest.skip("no shipped cnn-ae")
    seg, mae = models
    assert main(["-q", "segment", str(phantom_copy), "--segmenter", seg, "--workers", "0"]) == 0
    assert main(["-q", "refine", str(phantom_copy), "--method", "cnn-ae", "--workers", "0"]) == 0
    assert "refine" in capsys.readouterr().out
    # a MAE file given as the CNN-AE: one line, exit 2
    assert main(["-q", "refine", str(phantom_copy), "--method", "cnn-ae", "--refiner", mae,
                 "--workers", "0", "--overwrite"]) == 2
    assert "is a mae model, not cnn-ae" in capsys.readouterr().err
