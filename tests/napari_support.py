"""Loading napari-ome-zarr's reader without napari's GUI stack.

napari-ome-zarr's reader (``napari_get_reader``: how it finds nodes, names layers, reads
colours, contrast limits and properties) needs from napari only a colormap record and an affine
transform (``napari.utils.colormaps.Colormap``/``AVAILABLE_COLORMAPS``,
``napari.utils.transforms.Affine``). napari itself pulls a Qt/vispy stack and registers a pytest
plugin that fails under this suite's warnings-as-errors, so the test extras install
napari-ome-zarr without dependencies (Makefile) and, when napari is absent, these two small
classes stand in for napari's. With napari installed, napari's own are used.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np


class Colormap:
    """Colours at control points (what the reader compares and hands to napari)."""

    def __init__(self, colors, controls=None, interpolation: str = "linear", name: str = ""):
        self.colors = np.asarray(colors, dtype=float)
        n = len(self.colors)
        self.controls = (np.linspace(0, 1, n) if controls is None
                         else np.asarray(controls, dtype=float))
        self.interpolation = interpolation
        self.name = name


class Affine:
    """An (N+1)x(N+1) homogeneous transform built from scale, translation or a matrix."""

    def __init__(self, scale=None, translate=None, affine_matrix=None):
        if affine_matrix is not None:
            self.affine_matrix = np.asarray(affine_matrix, dtype=float)
            return
        n = len(scale if scale is not None else translate)
        m = np.eye(n + 1)
        if scale is not None:
            m[np.arange(n), np.arange(n)] = scale
        if translate is not None:
            m[:n, n] = translate
        self.affine_matrix = m

    @property
    def scale(self) -> np.ndarray:
        return np.linalg.norm(self.affine_matrix[:-1, :-1], axis=0)

    @scale.setter
    def scale(self, value) -> None:
        linear = self.affine_matrix[:-1, :-1]
        self.affine_matrix[:-1, :-1] = linear / self.scale * np.asarray(value, dtype=float)

    @property
    def translate(self) -> np.ndarray:
        return self.affine_matrix[:-1, -1]

    def compose(self, other: Affine) -> Affine:
        """``self`` after ``other``."""
        return Affine(affine_matrix=self.affine_matrix @ other.affine_matrix)


def napari_get_reader():
    """napari-ome-zarr's ``napari_get_reader`` (skips the test when it is not installed)."""
    import pytest

    try:
        importlib.import_module("napari.utils")
    except ImportError:
        napari = types.ModuleType("napari")
        utils = types.ModuleType("napari.utils")
        colormaps = types.ModuleType("napari.utils.colormaps")
        colormaps.Colormap, colormaps.AVAILABLE_COLORMAPS = Colormap, {}
        transforms = types.ModuleType("napari.utils.transforms")
        transforms.Affine = Affine
        napari.utils, utils.colormaps, utils.transforms = utils, colormaps, transforms
        sys.modules.update({"napari": napari, "napari.utils": utils,
                            "napari.utils.colormaps": colormaps,
                            "napari.utils.transforms": transforms})
    reader = pytest.importorskip("napari_ome_zarr")
    return reader.napari_get_reader
