"""Segmentation metrics (numpy and scikit-image only): Dice and the paper's biological-consistency
metrics."""

from volref.metrics.consistency import METRICS, SliceCounts, slice_counts, tile_metrics
from volref.metrics.dice import confusion, dice, dice_per_class

__all__ = ["METRICS", "SliceCounts", "confusion", "dice", "dice_per_class", "slice_counts",
           "tile_metrics"]
