"""A figure like the paper's Fig. 6: per tile, the image, the initial segmentation, the patches
removed for refinement, the refined segmentation and (for phantoms) the ground truth.

The removed patches are recomputed from the stored initial labels and uncertainty with the same
rule the refinement used (:func:`volref.stages.refine.removal_mask`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from volref.classes import CLASS_COLORS
from volref.errors import VolrefError
from volref.files import UserFileError, check_output_file
from volref.io import open_group, open_image
from volref.layout import GROUND_TRUTH, INITIAL, REFINED, UNCERTAINTY_PATH, finest, label_path
from volref.stages.refine import removal_mask
from volref.stages.settings import RefineSettings


def check_figure_file(out: str | os.PathLike, what: str) -> Path:
    """:func:`~volref.files.check_output_file`, and a suffix matplotlib can write (none: PNG):
    ``snapshot img x.zarr`` is one line before the drawing, not a traceback after it."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = check_output_file(out, what)
    suffix = path.suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UserFileError(f"cannot write {what} {path}: .{suffix} is not a figure format "
                            f"({', '.join(sorted(formats))})")
    return path

TILE = 128


def _rgb(labels: np.ndarray) -> np.ndarray:
    out = np.zeros(labels.shape + (3,))
    for value, rgba in CLASS_COLORS:
        out[labels == value] = np.array(rgba[:3]) / 255.0 * (rgba[3] / 255.0)
    return out


def pick_tiles(removed_count: np.ndarray, n: int,
               fraction: tuple[float, float] = (0.05, 0.5)) -> list[tuple[int, int, int]]:
    """``n`` tiles (z, y, x origins), at most one per slice, with the most removed pixels among
    those whose removed share lies in ``fraction`` — tiles the MAE can rebuild from their
    surroundings, as the method intends (a fully removed tile leaves it nothing to go on)."""
    share = removed_count / float(TILE * TILE)
    eligible = (share >= fraction[0]) & (share <= fraction[1])
    score = np.where(eligible, removed_count, -1)
    order = np.argsort(score.ravel(), kind="stable")[::-1]
    picked, slices = [], set()
    for flat in order:
        z, ty, tx = np.unravel_index(flat, removed_count.shape)
        if score[z, ty, tx] <= 0 or z in slices:
            continue
        picked.append((int(z), int(ty) * TILE, int(tx) * TILE))
        slices.add(z)
        if len(picked) == n:
            break
    return picked


def refinement_panel(location: str | os.PathLike, out: str | os.PathLike, *,
                     results: str | os.PathLike | None = None, n_tiles: int = 4,
                     settings: RefineSettings | None = None, channel: int | None = None,
                     timepoint: int | None = None) -> Path:
    """Draw ``n_tiles`` rows (the tiles with the most refinement) into ``out`` (PNG)."""
    settings = settings or RefineSettings()
    check_figure_file(out, "panel")
    vol = open_image(location, channel=channel, timepoint=timepoint)
    res = open_group(results or location, mode="r")
    try:
        initial, refined, unc = (_Planes(finest(res, p)) for p in (
            label_path(INITIAL), label_path(REFINED), UNCERTAINTY_PATH))
    except KeyError:
        raise VolrefError("run volref segment and volref refine first") from None
    root = open_group(location, mode="r")
    truth = (_Planes(finest(root, label_path(GROUND_TRUTH))) if GROUND_TRUTH in _labels(root)
             else None)
    nz, ny, nx = vol.shape
    gy, gx = ny // TILE, nx // TILE
    counts = np.zeros((nz, gy, gx), dtype=np.int64)
    masks = {}
    for z in range(nz):
        lab, u = initial[z], unc[z].astype(np.float32) / 255.0
        lab, u = lab[:gy * TILE, :gx * TILE], u[:gy * TILE, :gx * TILE]
        rm = removal_mask(lab, u, 4, settings.tau, settings.near_px)
        rm = np.kron(rm, np.ones((4, 4), bool))
        masks[z] = rm
        counts[z] = rm.reshape(gy, TILE, gx, TILE).sum(axis=(1, 3))
    tiles = pick_tiles(counts, n_tiles)
    if not tiles:
        raise VolrefError("no patch was removed anywhere: nothing to show")
    cols = ["image", "initial", "removed patches", "refined"] + (["ground truth"] if truth is not None else [])
    rows, names = [], []
    for z, y, x in tiles:
        win = (slice(y, y + TILE), slice(x, x + TILE))
        img = np.asarray(vol.data[z][win].compute(), dtype=np.float64)
        ini = initial[z][win]
        panels = [stretch(img), _rgb(ini), removed_rgb(ini, masks[z][win]),
                  _rgb(refined[z][win])]
        if truth is not None:
            panels.append(_rgb(truth[z][win]))
        rows.append(panels)
        names.append(f"z {z}, y {y}, x {x}")
    return draw_tiles(rows, cols, names, out, size=2.4, legend=True)


class _Planes:
    """``planes[z]``: the (y, x) slice z of a stored (t, c,) z, y, x array."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array

    def __getitem__(self, z: int) -> np.ndarray:
        return np.asarray(self.array[(0,) * (self.array.ndim - 3) + (z,)])


def pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stretch(image: np.ndarray) -> np.ndarray:
    """Grey values between the 0.5th and 99.8th percentiles mapped to [0, 1]."""
    lo, hi = np.percentile(image, [0.5, 99.8])
    return np.clip((image - lo) / max(hi - lo, 1e-9), 0.0, 1.0)


def removed_rgb(labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The labels' colours with the removed pixels dark."""
    shown = _rgb(labels)
    shown[removed] = (0.15, 0.15, 0.15)
    return shown


def draw_tiles(rows: list[list[np.ndarray]], cols: list[str], names: list[str],
               out: str | os.PathLike, size: float = 2.0, legend: bool = False) -> Path:
    """A grid of tiles (first column grey, the others RGB), titled by column, named by row;
    ``legend``: the class colours below (removed patches dark grey)."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(size * len(cols), size * len(rows)),
                             squeeze=False)
    for r, panels in enumerate(rows):
        for c, (ax, p) in enumerate(zip(axes[r], panels)):
            ax.imshow(p, cmap="gray" if c == 0 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r][0].set_ylabel(names[r], fontsize=7 if size > 2 else 6)
    if legend:
        from matplotlib.patches import Patch

        from volref.report.gallery import class_legend

        class_legend(fig, loc="lower center",
                     extra=[Patch(color=(0.15, 0.15, 0.15), label="removed patches")])
        fig.tight_layout(rect=(0, 0.35 / (size * len(rows)), 1, 1))
    else:
        fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _labels(root: zarr.Group) -> list[str]:
    from volref.io import label_names

    return label_names(root)
