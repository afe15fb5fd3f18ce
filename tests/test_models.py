"""Models and stages on CPU: shapes, entropy bounds, masking logic, checkpoints, tiny training."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from tests.helpers import TINY_MAE, TINY_UNET, refine_slice
from volref.classes import CRISTAE, MATRIX
from volref.errors import VolrefError
from volref.models import mae as mae_module
from volref.models.checkpoint import CheckpointError, load_state, save_model
from volref.models.ensemble import Ensemble, normalised_entropy
from volref.models.mae import MAEConfig, MaskedAutoencoder, sincos_2d
from volref.models.registry import (
    REFINER_KIND,
    file_hash,
    load_refiner,
    load_segmenter,
    save_segmenter,
)
from volref.models.unet import UNet
from volref.stages.refine import RefineSettings, refine_region, removal_mask
from volref.stages.segment import SegmentSettings, segment_slices


def test_unet_shapes():
    net = UNet(TINY_UNET).eval()
    assert net(torch.zeros(2, 3, 32, 48)).shape == (2, 4, 32, 48)


@pytest.mark.parametrize("batched", [False, True])  # in turn (CPU default), vmapped (GPU)
def test_ensemble_matches_members_and_entropy_is_bounded(batched):
    torch.manual_seed(0)
    members = [UNet(TINY_UNET).eval() for _ in range(3)]
    ens = Ensemble(members).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    torch.testing.assert_close(ens.mean_probabilities(x, batched), ref, atol=1e-5, rtol=1e-4)
    labels, u = ens.predict(x)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 32, 32)
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0


def test_entropy_extremes():
    certain = torch.tensor([[1.0, 0, 0, 0]]).reshape(1, 4, 1, 1)
    uniform = torch.full((1, 4, 1, 1), 0.25)
    assert float(normalised_entropy(certain)) == pytest.approx(0.0, abs=1e-6)
    assert float(normalised_entropy(uniform)) == pytest.approx(1.0, abs=1e-6)
    half = torch.tensor([0.5, 0.5, 0, 0]).reshape(1, 4, 1, 1)
    assert float(normalised_entropy(half)) == pytest.approx(math.log(2) / math.log(4), abs=1e-6)


def test_segment_slices_is_tile_invariant():
    """Same pixels whatever tile size: each pixel sees the same receptive field."""
    torch.manual_seed(1)
    ens = Ensemble([UNet(TINY_UNET).eval(), UNet(TINY_UNET).eval()]).eval()
    rng = np.random.default_rng(0)
    vol = rng.random((4, 40, 56)).astype(np.float32)
    outs = []
    for tile, halo in ((16, 24), (32, 24)):
        stack = np.pad(vol, ((1, 1), (halo, halo), (halo, halo)), mode="symmetric")
        outs.append(segment_slices(ens, stack, SegmentSettings(tile=tile, halo=halo)))
    # a 2-pooling U-Net's receptive field is < 24 px: interior results agree across tilings
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_mae_shapes_and_batch_invariance():
    torch.manual_seed(0)
    m = MaskedAutoencoder(TINY_MAE).eval()
    labels = torch.randint(0, 4, (3, 32, 32))
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 5:60] = True  # different numbers of visible patches in one batch
    with torch.no_grad():
        out = m(labels, mask)
        alone = m(labels[1:2], mask[1:2])
    assert out.shape == (3, 4, 32, 32)
    torch.testing.assert_close(out[1:2], alone, atol=1e-4, rtol=1e-4)


def test_mae_input_is_one_hot_not_intensity():
    m = MaskedAutoencoder(TINY_MAE)
    tokens = m.patchify(torch.tensor([[[0, 3], [2, 1]]]).repeat_interleave(2, 1).repeat_interleave(2, 2)
                        .reshape(1, 4, 4).repeat(1, 8, 8))
    assert tokens.shape[-1] == 4 * 4 * 4 and set(tokens.unique().tolist()) == {0.0, 1.0}


def test_sincos_embedding():
    e = sincos_2d(32, 8)
    assert e.shape == (64, 32)
    assert not torch.allclose(e[0], e[1])


# ---------------------------------------------------------------- masking logic


def _scene():
    """A slice with a mitochondrion in the middle, an uncertain patch on it and one far away."""
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[20:44, 20:44] = MATRIX
    labels[30:34, 20:44] = CRISTAE
    unc = np.zeros((64, 64), dtype=np.float32)
    unc[24:28, 24:28] = 0.9  # on the mitochondrion
    unc[0:4, 60:64] = 0.9  # far from it
    unc[28:32, 28:32] = 0.3  # below tau
    return labels, unc


def test_removed_patches_are_exactly_uncertain_and_near():
    labels, unc = _scene()
    mask = removal_mask(labels, unc, patch=4, tau=0.4, near_px=8)
    expected = np.zeros((16, 16), dtype=bool)
    expected[6, 6] = True
    np.testing.assert_array_equal(mask, expected)


def test_refine_changes_only_removed_pixels():
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE).eval()
    labels, unc = _scene()
    settings = RefineSettings(tile=32, stride=16, tau=0.4, near_px=8)
    m = settings.margin
    out = refine_slice(model, np.pad(labels, m), np.pad(unc, m), settings)
    assert out.labels.shape == labels.shape
    assert out.removed.sum() == 16
    np.testing.assert_array_equal(out.labels[~out.removed], labels[~out.removed])
    assert out.tiles_run < out.tiles_total  # tiles without a removed patch skip the MAE
    np.testing.assert_array_equal(out.rebuilt, out.removed)


def test_rebuilt_leaves_out_tiles_with_every_patch_removed():
    """A tile whose patches are all removed has nothing to rebuild from: its pixels stay
    removed but not rebuilt, and keep their class."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE).eval()
    labels, unc = _scene()
    unc[16:48, 16:48] = 0.9  # a whole tile (32 px) and more of the mitochondrion
    settings = RefineSettings(tile=32, stride=16, tau=0.4, near_px=8)
    m = settings.margin
    out = refine_slice(model, np.pad(labels, m), np.pad(unc, m), settings)
    kept = out.removed & ~out.rebuilt
    assert kept.any() and out.rebuilt.any() and not (out.rebuilt & ~out.removed).any()
    np.testing.assert_array_equal(out.labels[kept], labels[kept])


def test_smoothing_straightens_what_the_model_rebuilt_and_nothing_else():
    from volref.stages.refine import smoothed

    labels = np.zeros((24, 24), np.uint8)
    labels[:, 12:] = 3  # background | matrix, a straight boundary
    model_set = np.zeros((24, 24), bool)
    model_set[8:16, 8:16] = True
    acc = np.zeros((4, 24, 24), np.float32)
    weight = np.zeros((24, 24), np.float32)
    weight[model_set] = 2.0  # two tiles summed
    comb = np.zeros((8, 8), np.uint8)
    comb[:, 4:] = 3
    comb[::2, 3], comb[1::2, 4] = 3, 0  # a ragged 1-px comb along the boundary
    for k in (0, 3):
        acc[k, 8:16, 8:16] = 2.0 * np.where(comb == k, 0.6, 0.4)
    prob = smoothed(acc, weight, labels, model_set, sigma=1.5)
    assert prob.shape == acc.shape
    np.testing.assert_allclose(prob.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prob.argmax(axis=0)[model_set], labels[model_set])
    # sharp model outputs survive a small sigma: a rebuilt block of matrix stays matrix
    acc[:] = 0.0
    acc[3, 8:16, 8:16] = 2.0
    prob = smoothed(acc, weight, np.zeros_like(labels), model_set, sigma=1.0)
    assert (prob.argmax(axis=0)[10:14, 10:14] == 3).all()
    with pytest.raises(ValueError, match="smooth"):
        RefineSettings(smooth=1.0, blend="window")
    with pytest.raises(ValueError, match="smooth"):
        RefineSettings(smooth=11.0)  # reaches past the central block's 32 px
    with pytest.raises(ValueError, match="smooth"):
        RefineSettings(smooth=-1.0)


def test_refine_skips_everything_when_certain():
    model = MaskedAutoencoder(TINY_MAE).eval()
    labels, _ = _scene()
    settings = RefineSettings(tile=32, stride=16)
    m = settings.margin
    out = refine_slice(model, np.pad(labels, m), np.zeros((64 + 2 * m,) * 2, np.float32), settings)
    assert out.tiles_run == 0
    np.testing.assert_array_equal(out.labels, labels)


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_attention_equals_sdpa(masked, monkeypatch):
    monkeypatch.setattr(mae_module, "QUERY_CHUNK", 48)  # uneven chunks of 100 queries
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 100, 8, generator=g) for _ in range(3))
    key_mask = torch.rand(2, 100, generator=g) > 0.3 if masked else None
    got = mae_module.chunked_attention(q, k, v, key_mask)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_refine_in_bf16_agrees_with_fp32_and_lanes_do_not_change_bytes():
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE).eval()
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (2, 160, 160)).astype(np.uint8)
    unc = rng.random((2, 160, 160)).astype(np.float32)
    base = RefineSettings(tile=32, stride=16, tau=0.5, near_px=8)  # context 32
    threads = torch.get_num_threads()
    runs = {}
    try:
        for precision, lanes in (("fp32", 1), ("bf16", 1), ("bf16", 2)):
            torch.set_num_threads(lanes)
            settings = dataclasses.replace(base, precision=precision)
            runs[precision, lanes] = refine_region(model, labels, unc, settings)
    finally:
        torch.set_num_threads(threads)
    assert runs["bf16", 1].tiles_run > 10
    np.testing.assert_array_equal(runs["bf16", 1].labels, runs["bf16", 2].labels)
    removed = runs["fp32", 1].removed
    same = runs["fp32", 1].labels[removed] == runs["bf16", 1].labels[removed]
    assert same.mean() > 0.97
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast


@pytest.mark.parametrize(("blend", "smooth", "uncertain"),
                         [("window", 0.0, 0.1), ("centre", 0.0, 0.1), ("centre", 2.5, 0.6)])
def test_refine_region_cut_in_two_gives_the_same_bytes(blend, smooth, uncertain):
    """Regions cut on the tile grid (with their context) rebuild exactly what the whole does.
    (Smoothing with a reach past the central block's half, sigma 6 here, breaks it: 40 pixels
    differ with 60 % of the patches uncertain.)"""
    from volref.stages.refine import context

    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE).eval()
    rng = np.random.default_rng(5)
    settings = RefineSettings(tile=32, stride=16, tau=0.5, near_px=8, blend=blend, smooth=smooth)
    c = context(settings, TINY_MAE.patch)
    labels = rng.integers(0, 4, (2, 64 + 2 * c, 96 + 2 * c)).astype(np.uint8)
    sparse = rng.random((2, labels.shape[1] // 4, labels.shape[2] // 4)) < uncertain
    unc = np.kron(sparse, np.ones((1, 4, 4))).astype(np.float32)  # that share of patches uncertain
    whole = refine_region(model, labels, unc, settings)
    left = refine_region(model, labels[:, :, :48 + 2 * c], unc[:, :, :48 + 2 * c], settings)
    right = refine_region(model, labels[:, :, 48:], unc[:, :, 48:], settings)
    np.testing.assert_array_equal(whole.labels, np.concatenate([left.labels, right.labels], 2))
    assert whole.removed.any()
    np.testing.assert_array_equal(whole.labels[~whole.removed],
                                  labels[:, c:-c, c:-c][~whole.removed])


def test_centre_blend_runs_fewer_tiles_where_removals_are_sparse():
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE).eval()
    labels, unc = _scene()  # one uncertain patch
    runs = {}
    for blend in ("window", "centre"):
        settings = RefineSettings(tile=32, stride=16, tau=0.4, near_px=8, blend=blend, smooth=0)
        m = settings.margin
        runs[blend] = refine_slice(model, np.pad(labels, m), np.pad(unc, m), settings)
    assert runs["centre"].tiles_run == 1 < runs["window"].tiles_run == 4
    np.testing.assert_array_equal(runs["centre"].removed, runs["window"].removed)
    with pytest.raises(ValueError, match="blend"):
        RefineSettings(blend="mean")


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        RefineSettings(precision="fp8")


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    members = [UNet(TINY_UNET).eval() for _ in range(2)]
    path = save_segmenter(tmp_path / "seg.safetensors", members, {"note": "test"})
    ens = load_segmenter(path)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ens.mean_probabilities(x), Ensemble(members).mean_probabilities(x))
    mae = MaskedAutoencoder(TINY_MAE).eval()
    save_model(tmp_path / "mae.safetensors", mae, REFINER_KIND, TINY_MAE.to_dict())
    back = load_refiner(tmp_path / "mae.safetensors")
    for (k, a), (_, b) in zip(mae.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_safetensors_header_length_may_start_like_a_pickle(tmp_path):
    """A header of 0x..80 bytes begins with 0x80, the pickle magic: still a safetensors file."""
    from volref.models.checkpoint import load_tensors, save_tensors

    t = {"w": torch.arange(3.0)}
    for pad in range(256):
        path = save_tensors(tmp_path / "m.safetensors", t, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    back, meta = load_tensors(path)
    torch.testing.assert_close(back["w"], t["w"])


def test_pickle_checkpoint_is_refused_without_loading(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("pickle was executed",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_refiner(path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="pickle"):
        load_segmenter(tmp_path / "model.pth")


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_refiner(tmp_path / "missing.safetensors")
    mae = MaskedAutoencoder(TINY_MAE)
    path = save_model(tmp_path / "mae.safetensors", mae, REFINER_KIND, TINY_MAE.to_dict())
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_refiner(truncated)
    with pytest.raises(CheckpointError, match="expected volref-unet-ensemble"):
        load_segmenter(path)
    wrong = MAEConfig(**{**TINY_MAE.to_dict(), "n_classes": 3})
    save_model(tmp_path / "c3.safetensors", MaskedAutoencoder(wrong), REFINER_KIND, wrong.to_dict())
    with pytest.raises(CheckpointError, match="3 classes"):
        load_refiner(tmp_path / "c3.safetensors")
    lying = save_model(tmp_path / "lie.safetensors", MaskedAutoencoder(TINY_MAE), REFINER_KIND,
                       {**TINY_MAE.to_dict(), "depth": 3})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_refiner(lying)
    _, meta = load_state(path, REFINER_KIND)
    assert meta["config"]["tile"] == 32


# ---------------------------------------------------------------- training


def test_tiny_mae_training_lowers_the_loss():
    from volref.train.refiner import RefinerRecipe, TilePool, make_batch

    rng = np.random.default_rng(0)
    base, _ = _scene()
    labels = np.stack([np.roll(base, (int(rng.integers(-8, 8)), int(rng.integers(-8, 8))), (0, 1))
                       for _ in range(16)])[:, 16:48, 16:48]
    pool = TilePool(labels, np.zeros(labels.shape, np.float32))
    recipe = RefinerRecipe(batch=8, crop=32, mae=TINY_MAE, lr=3e-3, bf16=False)
    torch.manual_seed(0)
    model = MaskedAutoencoder(TINY_MAE)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    w = torch.tensor(recipe.class_weights)
    fixed = make_batch(pool, recipe, np.random.default_rng(1))

    def loss_on(batch):
        lab, mask, keep, off, _ = batch
        return model.forward_loss(model(lab, mask, off), lab, mask, keep, w)

    with torch.no_grad():
        before = float(loss_on(fixed))
    for _ in range(60):
        loss = loss_on(make_batch(pool, recipe, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_on(fixed))
    assert after < 0.8 * before


def test_refiner_training_can_start_from_other_weights(tmp_path):
    """``--init``: a 128x128 run continues from a 64x64-crop run's weights; the card records
    the start's hash, and a start whose architecture differs is refused."""
    import json

    from volref.train.refiner import RefinerRecipe, TilePool, train_refiner

    base, _ = _scene()
    labels = np.stack([base[8:40, 8:40], base[16:48, 16:48]])
    pool = TilePool(labels, np.zeros(labels.shape, np.float32))
    recipe = RefinerRecipe(epochs=1, steps_per_epoch=1, batch=2, crop=32, mae=TINY_MAE, bf16=False)
    first = train_refiner(pool, recipe, tmp_path / "a")
    start = load_refiner(first)
    no_steps = dataclasses.replace(recipe, lr=1e-30, init=str(first))  # lr ~0: weights stay
    second = load_refiner(train_refiner(pool, no_steps, tmp_path / "b"))
    for (k, x), (_, y) in zip(start.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=k)
    card = json.loads((tmp_path / "b" / "refiner.json").read_text())["card"]
    assert card["init_sha256"] == file_hash(first)
    other = dataclasses.replace(no_steps, mae=dataclasses.replace(TINY_MAE, depth=TINY_MAE.depth + 1))
    with pytest.raises(VolrefError, match="does not fit"):
        train_refiner(pool, other, tmp_path / "c")


def test_tiny_segmenter_training_lowers_the_loss(small_phantom, tmp_path):
    from volref.train.data import load_volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    vol = load_volume(small_phantom)
    recipe = SegmenterRecipe(members=2, epochs=2, steps_per_epoch=8, batch=4, crop=32,
                             unet=TINY_UNET, lr=1e-2)
    path = train_segmenter([vol], recipe, tmp_path / "seg")
    import json

    card = json.loads(path.with_suffix(".json").read_text())["card"]
    losses = card["loss_per_epoch"]["member-0"]
    assert losses[-1] < losses[0]
    assert len(load_segmenter(path).members) == 2
    # resume: a finished run re-opened trains nothing more and gives the same file contents
    again = train_segmenter([vol], recipe, tmp_path / "seg")
    assert again.read_bytes() == path.read_bytes()


def test_interrupted_training_resumes_to_identical_weights(small_phantom, tmp_path):
    from volref.train.data import load_volume
    from volref.train.segmenter import SegmenterRecipe, train_segmenter

    vol = load_volume(small_phantom)
    recipe = SegmenterRecipe(members=1, epochs=3, steps_per_epoch=3, batch=2, crop=32,
                             unet=TINY_UNET)
    straight = train_segmenter([vol], recipe, tmp_path / "straight")

    class Stop(Exception):
        pass

    def interrupt(event):
        if event["epoch"] == 2 and event["step"] == 5:  # mid-way through the second epoch
            raise Stop

    with pytest.raises(Stop):
        train_segmenter([vol], recipe, tmp_path / "resumed", observer=interrupt)
    assert not (tmp_path / "resumed" / "segmenter.safetensors").exists()
    resumed = train_segmenter([vol], recipe, tmp_path / "resumed")
    a, b = load_segmenter(straight), load_segmenter(resumed)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_blob_removal_is_one_piece_of_candidates():
    """``blob_fraction``: removed patches as one contiguous spot, chosen among the candidates."""
    from scipy import ndimage

    from volref.train.refiner import blob

    rng = np.random.default_rng(0)
    grid = 16
    candidates = np.flatnonzero(np.arange(grid * grid) % grid < 12)  # the 12 left columns
    for count in (1, 20, 100, len(candidates)):
        chosen = blob(candidates, count, grid, rng)
        assert len(chosen) == len(set(chosen)) == count
        assert np.isin(chosen, candidates).all()
        mask = np.zeros(grid * grid, bool)
        mask[chosen] = True
        assert ndimage.label(mask.reshape(grid, grid))[1] <= 2  # noise may nick off a patch
    assert len(blob(candidates, 0, grid, rng)) == 0
