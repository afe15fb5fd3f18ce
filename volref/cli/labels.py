"""The options that name a segmentation another tool made (``volref refine`` and ``volref train
refiner``): ``--labels``, ``--class-map``, ``--uncertainty``."""

from __future__ import annotations

from typing import Any

import click

from volref.errors import SettingsError
from volref.layout import INITIAL, UNCERTAINTY_PATH, label_path
from volref.settings import default_of
from volref.stages.settings import LabelSettings


def label_options(verb: str, where: str) -> tuple[Any, ...]:
    """The three options; ``verb`` ("Refine", "Train on") starts ``--labels``'s help, ``where``
    says which stores are searched."""
    return (
        click.option("--labels", "labels", type=str, default=None, metavar="NAME",
                     help=f"{verb} this label image of the archive (labels/NAME, written by any "
                          "tool: any integer type, chunks and levels; its finest level must "
                          f"match the image) instead of {label_path(INITIAL)}. {where}"),
        click.option("--class-map", type=str, default=default_of(LabelSettings, "class_map"),
                     metavar="MAP", show_default=True,
                     help="With --labels: the label image's value for each of volref's four "
                          "classes, each class once; a class may take several values joined by "
                          "+ (background=0+4+5 merges them). Values the map does not name are "
                          "refused."),
        click.option("--uncertainty", type=str, default=None, metavar="PATH",
                     help="With --labels: path of an image in the archive holding the labels' "
                          "uncertainty: normalised entropy (floats in [0, 1], or unsigned "
                          "integers scaled to their maximum: uint8 255 = 1), or per-class "
                          "probabilities along a channel axis (their entropy / log C is used). "
                          f"Default: the ensemble's, {UNCERTAINTY_PATH} (run volref segment "
                          "first)."),
    )


def label_settings(options: dict[str, Any]) -> LabelSettings:
    """The :class:`LabelSettings` of the options (absent ones keep their defaults); a bad value
    is a usage error that names its flag."""
    try:
        return LabelSettings(options.get("labels"),
                             options.get("class_map", default_of(LabelSettings, "class_map")),
                             options.get("uncertainty"))
    except SettingsError as exc:
        raise click.BadParameter(str(exc), param_hint="--" + exc.field.replace("_", "-")) \
            from None
