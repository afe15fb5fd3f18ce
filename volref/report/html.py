"""``volref report``: one self-contained HTML page (and its PNGs) about a refined volume.

What it shows, all read from the store:

* slices at a quarter, half and three quarters of the depth: image, initial labels, refined
  labels and the ensemble's uncertainty as a heat map;
* before/after tiles (:func:`volref.report.panel.refinement_panel`): image, initial, removed
  patches, refined, and ground truth where the store has it;
* per-mitochondrion metrics (``volref/metrics.parquet``, written by ``volref measure``):
  histograms before vs after refinement and a table of means;
* provenance: models, their hashes and the settings each stage ran with.

The PNGs are written beside ``index.html`` and embedded in it (base64), so the page can be
mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import zarr

from volref.classes import mitochondria
from volref.errors import VolrefError
from volref.io import Volume, open_group, open_image
from volref.io.store import read_file
from volref.layout import (
    INITIAL,
    META,
    METRICS_CSV,
    METRICS_TABLE,
    METRICS_TABLE_PATH,
    MITOCHONDRIA,
    MITOCHONDRIA_TABLE,
    PROVENANCE,
    REFINED,
    UNCERTAINTY_PATH,
    existing_levels,
    finest,
    label_path,
    table_path,
)
from volref.metrics import METRICS
from volref.report.evaluation import TITLES
from volref.report.gallery import class_legend, depth, gallery_figure, plane, scale_bar
from volref.report.panel import _rgb, pyplot, refinement_panel, stretch


def slices_figure(vol: Volume, results: zarr.Group, out: Path, n: int = 3) -> Path:
    """Slices at a quarter, half and three quarters of the depth: image, initial, refined and
    uncertainty, with the depth in µm, a scale bar and the class legend."""
    plt = pyplot()
    nz = vol.shape[0]
    zs = sorted({int(round(nz * (i + 1) / (n + 1))) for i in range(n)})
    initial = finest(results, label_path(INITIAL))
    refined = finest(results, label_path(REFINED))
    unc = finest(results, UNCERTAINTY_PATH)
    cols = ["image", "initial labels", "refined labels", "uncertainty (0-1)"]
    fig, axes = plt.subplots(len(zs), 4, figsize=(12, 3.1 * len(zs) + 0.5), squeeze=False)
    for r, z in enumerate(zs):
        img = np.asarray(vol.data[z].compute(), dtype=np.float64)
        u = plane(unc, z).astype(np.float32) / 255.0
        panels = [(stretch(img), "gray"), (_rgb(plane(initial, z)), None),
                  (_rgb(plane(refined, z)), None), (u, "magma")]
        for c, (ax, (p, cmap)) in enumerate(zip(axes[r], panels)):
            shown = ax.imshow(p, cmap=cmap, interpolation="nearest",
                              **({"vmin": 0, "vmax": 1} if c == 3 else {}))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
            if c == 3:
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        scale_bar(axes[r][0], vol, img.shape[1])
        axes[r][0].set_ylabel(depth(vol, z), fontsize=9)
    class_legend(fig, loc="lower center")
    fig.tight_layout(rect=(0, 0.5 / (3.1 * len(zs) + 0.5), 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def metrics_table(results: zarr.Group):
    """The per-mitochondrion table, or None when ``volref measure`` has not run."""
    import pandas as pd

    raw = read_file(results.require_group(META), METRICS_TABLE) if META in results else None
    return None if raw is None else pd.read_parquet(io.BytesIO(raw))


def histograms_figure(table, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.3 * len(METRICS), 3.0))
    for ax, m in zip(axes, METRICS):
        a = table[f"initial_{m}"].to_numpy(dtype=float)
        b = table[f"refined_{m}"].to_numpy(dtype=float)
        both = np.concatenate([a[np.isfinite(a)], b[np.isfinite(b)]])
        bins = np.histogram_bin_edges(both, bins=15) if both.size else 10
        # outlines, not translucent bars: overlapping bars mix into a third colour
        ax.hist(a[np.isfinite(a)], bins=bins, histtype="step", lw=1.6, color="#777777",
                label="initial")
        ax.hist(b[np.isfinite(b)], bins=bins, histtype="step", lw=1.6, color="#0072B2",
                label="refined")
        ax.set_title(TITLES[m], fontsize=9)
        ax.set_ylabel("mitochondria", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(location: str | os.PathLike, out: str | os.PathLike, *,
                 results: str | os.PathLike | None = None, tiles: int = 4,
                 channel: int | None = None, timepoint: int | None = None,
                 gallery: int = 8) -> Path:
    """Write ``OUT/index.html`` with its PNGs for the refined volume at ``location`` (results in
    ``results`` when they were written to a separate store; ``channel``/``timepoint`` choose the
    image of a multi-channel or time-lapse ``location``)."""
    out = Path(out)
    where = results or location
    res = open_group(where, mode="r")
    for key, command in ((label_path(INITIAL), "segment"), (label_path(REFINED), "refine")):
        if existing_levels(res, key) is None:
            hint = "" if results else " (or pass --output STORE if the results went to one)"
            raise VolrefError(f"{where} has no {key}: run volref {command} first{hint}")
    vol = open_image(location, channel=channel, timepoint=timepoint)
    try:  # only once the inputs are known good: a refused report leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VolrefError(f"cannot make the report folder {out}: {exc.strerror or exc}") from None
    sections = []
    slices = slices_figure(vol, res, out / "slices.png")
    sections.append(("Slices", "Image, initial and refined labels (colours: the legend below "
                     "the figure), and the ensemble's uncertainty (normalised entropy, 0 = all "
                     "members agree, 1 = no class preferred). Depth below the first slice; "
                     "scale bar in the image's units.", _img(slices, "slices")))
    try:
        panel = refinement_panel(location, out / "tiles.png", results=results, n_tiles=tiles,
                                 channel=channel, timepoint=timepoint)
        sections.append(("Before and after", "Tiles with the most refinement: the removed "
                         "patches (dark) were rebuilt by the refiner.", _img(panel, "tiles")))
    except VolrefError as exc:
        sections.append(("Before and after", html.escape(str(exc)), ""))
    table = metrics_table(res)
    summary = ""
    if table is not None and len(table):
        hist = histograms_figure(table, out / "metrics.png")
        rows = "".join(
            f"<tr><td>{html.escape(TITLES[m])}</td><td>{np.nanmean(table[f'initial_{m}']):.2f}"
            f"</td><td>{np.nanmean(table[f'refined_{m}']):.2f}</td></tr>" for m in METRICS)
        summary = (f"<p>{mitochondria(len(table))}.</p><table><tr><th>metric (mean per "
                   f"mitochondrion)</th><th>initial</th><th>refined</th></tr>{rows}</table>")
        table.to_csv(out / METRICS_CSV, index=False)
        link = (f"<p>The whole table, one row per mitochondrion (ids as in "
                f"{label_path(MITOCHONDRIA)}; units in the store's "
                f"{table_path(MITOCHONDRIA_TABLE)} metadata): <a href='{METRICS_CSV}'>"
                f"{METRICS_CSV}</a>; in the store: {METRICS_TABLE_PATH} and "
                f"{table_path(MITOCHONDRIA_TABLE)} (ngio, Fractal).</p>")
        sections.append(("Per-mitochondrion metrics", summary + link + "<p>Histograms: "
                         "outlines, grey before and blue after refinement.</p>",
                         _img(hist, "metrics")))
        shown, rows = gallery_figure(vol, res, table, out / "gallery.png", n=gallery)
        sections.append(("Mitochondria that changed most", "Single mitochondria, most changed "
                         "by refinement first (summed change of the five metrics, each in units "
                         "of its spread): the slice through each one's centre, its outline in "
                         f"white, its id in {label_path(MITOCHONDRIA)} and its metrics before → "
                         "after.", _img(shown, "gallery")))
    else:
        sections.append(("Per-mitochondrion metrics", "No metrics table: run volref measure.",
                         ""))
    raw = read_file(res[META], PROVENANCE) if META in res else None
    provenance = json.loads(raw) if raw else {}
    sections.append(("Provenance", "Models and settings each stage ran with.",
                     f"<pre>{html.escape(json.dumps(provenance, indent=2, sort_keys=True))}</pre>"))
    title = f"volref report — {Path(str(location)).name}"
    body = "".join(f"<h2>{html.escape(h)}</h2><p>{p}</p>{fig}" for h, p, fig in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;}"
            "img{max-width:100%;}table{border-collapse:collapse;}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right;}pre{background:#f6f6f6;padding:1em;"
            "overflow:auto;font-size:12px;}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index
