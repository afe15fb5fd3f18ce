"""Segmentation metrics (numpy only): Dice now; the paper's biological-consistency metrics next."""

from volref.metrics.dice import dice, dice_per_class

__all__ = ["dice", "dice_per_class"]
