"""The experiment functions on arrays whose answers can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.models import (
    clear_tiles,
    reconstruction_dice,
    segmentation_dice,
    uncertainty_under_degradation,
)
from tests.helpers import TINY_MAE
from volref.metrics import confusion, dice, dice_per_class
from volref.models.mae import MaskedAutoencoder


def test_dice_by_hand():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    pred = np.array([0, 1, 2, 3])
    np.testing.assert_allclose(dice_per_class(pred, pred, 4), np.ones(4))
    region = np.array([1, 1, 0, 0], bool)
    np.testing.assert_allclose(dice_per_class(np.array([0, 1, 0, 0]), np.array([0, 1, 3, 3]), 4,
                                              region), [1, 1, 1, 1])


def test_confusion_by_hand():
    truth = np.array([[0, 2], [2, 3]], np.uint8)
    pred = np.array([[0, 3], [2, 3]], np.uint8)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = expected[2, 2] = expected[2, 3] = expected[3, 3] = 1
    np.testing.assert_array_equal(confusion(truth, pred, 4), expected)
    assert confusion(truth[:0], pred[:0], 4).sum() == 0


def test_uncertainty_rise():
    instances = np.array([1, 1, 2, 2, 3, 3, 0, 0])
    degraded = np.array([1, 0, 1, 1, 1, 0, 1, 1])
    before = np.array([0.1, 9, 0.2, 0.2, 0.4, 9, 9, 9])
    after = np.array([0.5, 9, 0.6, 0.6, 0.6, 9, 9, 9])
    r = uncertainty_under_degradation(before, after, instances, degraded)
    assert r["areas"] == 3
    assert r["mean_before"] == pytest.approx((0.1 + 0.2 + 0.4) / 3)
    assert r["mean_after"] == pytest.approx((0.5 + 0.6 + 0.6) / 3)
    assert r["relative_rise_percent"] == pytest.approx(100 * (1.7 / 0.7 - 1))
    assert r["lowest_decile_areas"] == 1 and r["lowest_decile_moved_to_top60"] == 1


def test_segmentation_dice_whole_mitochondrion():
    truth = np.array([0, 1, 2, 3, 3])
    pred = np.array([0, 3, 3, 3, 0])
    d = segmentation_dice(pred, truth, None)
    assert d["mitochondrion"] == pytest.approx(2 * 3 / (3 + 4))  # 3 of 4 true voxels found
    assert d["per_class"]["intermembrane space"] == 0.0


def test_clear_tiles_and_reconstruction_dice():
    labels = np.zeros((2, 64, 64), np.uint8)
    labels[:, 8:56, 8:56] = 3
    degraded = np.zeros_like(labels)
    degraded[1, 0, 0] = 1
    unc = np.zeros(labels.shape, np.float32)
    unc[:, :, 32:] = 0.3  # right half: certain below 0.4, not below 0.1
    tiles = clear_tiles(labels, degraded, unc, tile=32)
    assert len(tiles.labels) == 7  # one tile of the second slice holds a degraded voxel
    assert tiles.uncertainty.shape == tiles.labels.shape
    torch.manual_seed(0)
    r = reconstruction_dice(MaskedAutoencoder(TINY_MAE).eval(), tiles, ratio=0.5)
    assert 0.0 <= r["mean_dice"] <= 1.0 and r["tiles"] == 7
    assert all(0.0 <= v <= 1.0 for v in r["recall"]["0.1"].values())
    n = r["micro_dice_pixels"]
    assert 0 < n["0.1"] < n["0.4"]  # the right-half tiles count only below 0.4
    assert 0.0 <= r["micro_dice"]["0.1"] <= 1.0


def test_reconstruction_dice_of_a_perfect_model_is_one():
    """A model that returns the tile's own labels scores 1 on every measure."""

    class Oracle(MaskedAutoencoder):
        def forward(self, labels, mask, offset=(0, 0), pad_to=None):
            return torch.nn.functional.one_hot(labels.long(), 4).permute(0, 3, 1, 2).float()

    labels = np.zeros((1, 32, 64), np.uint8)
    labels[0, 4:28, 4:60] = 3
    labels[0, 10:20, 20:24] = 2
    labels[0, 4:6, 4:60] = 1
    tiles = clear_tiles(labels, None, np.zeros(labels.shape, np.float32), tile=32)
    r = reconstruction_dice(Oracle(TINY_MAE).eval(), tiles, ratio=0.9)
    assert r["mean_tile_dice"] == 1.0 and r["pixel_accuracy"] == 1.0
    assert r["micro_dice"] == {"0.1": 1.0, "0.4": 1.0}
    assert set(r["recall"]["0.1"].values()) == {1.0}

    class CristaeBlind(MaskedAutoencoder):  # rebuilds cristae as matrix, all else right
        def forward(self, labels, mask, offset=(0, 0), pad_to=None):
            blind = torch.where(labels == 2, 3, labels.long())
            return torch.nn.functional.one_hot(blind, 4).permute(0, 3, 1, 2).float()

    r = reconstruction_dice(CristaeBlind(TINY_MAE).eval(), tiles, ratio=0.9)
    recall = r["recall"]["0.1"]
    assert recall["cristae"] == 0.0 and recall["matrix"] == 1.0 and r["micro_dice"]["0.1"] < 1
