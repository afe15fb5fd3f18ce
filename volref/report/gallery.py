"""Pieces of the report a biologist reads: class legend, scale bar, depth in µm, and a gallery of
single mitochondria (their ids and metrics before/after refinement, most changed first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from volref.classes import CLASS_COLORS, CLASS_NAMES
from volref.io import Volume
from volref.layout import INITIAL, MITOCHONDRIA, REFINED, finest, label_path
from volref.metrics import METRICS
from volref.report.panel import _rgb, pyplot, stretch

#: short names of the metrics for captions
SHORT = {"skeleton_end_points": "end points", "skeleton_cycles": "cycles",
         "boundary_area_ratio": "boundary/area %", "cristae_boundary_ratio": "cristae/IMS %",
         "inner_membrane_background_ratio": "inner/background %"}


def plane(array: zarr.Array, z: int, window: tuple[slice, slice] = (slice(None), slice(None))):
    """``array[z, y, x]`` of a stored (t, c,) z, y, x array (leading axes of size 1)."""
    return np.asarray(array[(0,) * (array.ndim - 3) + (z,) + window])


def unit(vol: Volume) -> str:
    u = vol.units[-1]
    return "µm" if u in (None, "micrometer") else u


def depth(vol: Volume, z: int) -> str:
    """``z = 12 (4.50 µm)``: slice index and depth below the first slice."""
    return f"z = {z} ({z * vol.scale[0] + vol.translation[0]:.2f} {unit(vol)})"


def scale_bar(ax, vol: Volume, width_px: int) -> None:
    """A white bar of a round length (about a fifth of the panel) at the bottom left."""
    px = vol.scale[-1]
    target = width_px * px / 5
    length = max((v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if v <= target),
                 default=0.1)
    bar = length / px
    h = ax.get_ylim()[0]
    ax.plot([width_px * 0.05, width_px * 0.05 + bar], [h * 0.93, h * 0.93], color="white", lw=3,
            solid_capstyle="butt")
    ax.text(width_px * 0.05, h * 0.88, f"{length:g} {unit(vol)}", color="white", fontsize=7)


def class_legend(fig, extra=(), **kw) -> None:
    """Patches for the classes as label images colour them (background left out), and
    ``extra`` handles."""
    from matplotlib.patches import Patch

    handles = [Patch(color=(rgba[0] / 255, rgba[1] / 255, rgba[2] / 255), label=CLASS_NAMES[v])
               for v, rgba in CLASS_COLORS if rgba[3]] + list(extra)
    fig.legend(handles=handles, ncol=len(handles), frameon=False, fontsize=9, **kw)


def most_changed(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` mitochondria whose metrics changed most with refinement: the sum over metrics
    of |refined - initial| in units of the metric's spread over all mitochondria."""
    score = np.zeros(len(table))
    for m in METRICS:
        a, b = table.get(f"initial_{m}"), table.get(f"refined_{m}")
        if a is None or b is None:
            continue
        d = (b - a).abs().to_numpy(dtype=float)
        spread = np.nanstd(np.concatenate([a.to_numpy(float), b.to_numpy(float)]))
        score += np.nan_to_num(d / spread if spread > 0 else d)
    order = np.argsort(-score, kind="stable")[:n]
    return table.iloc[order].assign(change=score[order])


def gallery_figure(vol: Volume, results: zarr.Group, table: pd.DataFrame, out: Path,
                   n: int = 8, size: int = 128) -> tuple[Path, pd.DataFrame]:
    """One row per mitochondrion (most changed first): image, initial, refined at the slice
    through its centre, its outline from ``labels/volref-mitochondria``, id and metrics."""
    plt = pyplot()
    rows = most_changed(table, n)
    initial = finest(results, label_path(INITIAL))
    refined = finest(results, label_path(REFINED))
    ids = finest(results, label_path(MITOCHONDRIA))
    _, ny, nx = vol.shape
    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 2.5 * len(rows) + 0.6), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.5]})
    for r, (_, row) in enumerate(rows.iterrows()):
        z = int(round(row["centroid_z"]))
        cy, cx = int(round(row["centroid_y"])), int(round(row["centroid_x"]))
        half = max(size // 2, int(max(row["bbox_y1"] - row["bbox_y0"],
                                      row["bbox_x1"] - row["bbox_x0"]) // 2) + 8)
        half = min(half, 160)
        y0, x0 = max(0, min(cy - half, ny - 2 * half)), max(0, min(cx - half, nx - 2 * half))
        win = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
        img = np.asarray(vol.data[z][win].compute(), dtype=np.float64)
        own = plane(ids, z, win) == int(row["label"])
        for c, (title, shown) in enumerate((("image", stretch(img)),
                                            ("initial", _rgb(plane(initial, z, win))),
                                            ("refined", _rgb(plane(refined, z, win))))):
            ax = axes[r][c]
            ax.imshow(shown, cmap="gray" if c == 0 else None, interpolation="nearest")
            if own.any():
                ax.contour(own, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
        scale_bar(axes[r][0], vol, img.shape[1])
        axes[r][0].set_ylabel(f"id {int(row['label'])}\n{depth(vol, z)}", fontsize=8)
        lines = [f"mitochondrion {int(row['label'])}",
                 f"volume {row.get('volume_um3', float('nan')):.2f} µm³, skeleton "
                 f"{row.get('skeleton_length_um', float('nan')):.1f} µm",
                 "metric: initial → refined"]
        lines += [f"{SHORT[m]}: {row[f'initial_{m}']:.2f} → {row[f'refined_{m}']:.2f}"
                  for m in METRICS if f"initial_{m}" in row]
        axes[r][3].axis("off")
        axes[r][3].text(0, 0.95, "\n".join(lines), va="top", fontsize=8, family="monospace")
    class_legend(fig, loc="lower center")
    fig.tight_layout(rect=(0, 0.6 / (2.5 * len(rows) + 0.6), 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out, rows
