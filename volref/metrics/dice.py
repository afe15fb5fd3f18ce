"""Dice overlap, per class and for arbitrary masks, optionally inside a region; confusion counts."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing to disagree on)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int,
                   region: np.ndarray | None = None) -> np.ndarray:
    """Dice of each class ``0..n_classes-1``, counting only voxels inside ``region``."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    if region is not None:
        region = region.astype(bool)
        pred, truth = pred[region], truth[region]
    return np.array([dice(pred == c, truth == c) for c in range(n_classes)])


def confusion(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``(n_classes, n_classes)`` of (true class, predicted class) pairs; rows: truth."""
    idx = truth.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
