"""Figures of ``volref evaluate``: a panel like the paper's Fig. 6 (per tile: image, initial,
removed patches, every method's result, ground truth) and one bar plot per metric, by method,
with the control group's mean ± standard error as a band."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from volref.methods import DEFAULT_METHOD, table_order
from volref.metrics import METRICS
from volref.report.panel import _rgb, draw_tiles, pyplot, removed_rgb, stretch

TITLES = {"skeleton_end_points": "skeleton end points", "skeleton_cycles": "skeleton cycles",
          "boundary_area_ratio": "boundary / area (%)",
          "cristae_boundary_ratio": "cristae boundary ratio (%)",
          "inner_membrane_background_ratio": "inner membrane / background (%)"}


def table2_panel(examples: list[dict], out: str | os.PathLike,
                 methods: tuple[str, ...] | None = None) -> Path:
    """One row per example tile: image, initial, removed patches, each method (default: every
    method of the registry, as tables list them), ground truth."""
    methods = table_order() if methods is None else methods
    methods = tuple(m for m in methods if examples and m in examples[0]["labels"])
    cols = ["image", "initial", "removed patches", *methods, "ground truth"]
    rows = [[stretch(ex["image"].astype(np.float64)), _rgb(ex["initial"]),
             removed_rgb(ex["initial"], ex["removed"]),
             *(_rgb(ex["labels"][m]) for m in methods), _rgb(ex["truth"])] for ex in examples]
    return draw_tiles(rows, cols, [ex["where"] for ex in examples], out, size=1.9)


def table2_bars(result: dict, out: str | os.PathLike) -> Path:
    """Mean ± standard error of each metric by method; the control group as an orange band, the
    default method in dark blue, the ground truth of the same tiles (phantoms) in black."""
    plt = pyplot()
    table = result["methods"]
    default = result.get("default_method", DEFAULT_METHOD)
    names = [m for m in table if m != "control"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS):
        means = [table[n][metric]["mean"] for n in names]
        sems = [table[n][metric]["sem"] for n in names]
        ax.bar(range(len(names)), means, yerr=sems, capsize=3,
               color=["#999999" if n == "initial" else "#0072B2" if n == default
                      else "#000000" if n == "truth" else "#56B4E9" for n in names])
        if "control" in table:
            c = table["control"][metric]
            ax.axhspan(c["mean"] - c["sem"], c["mean"] + c["sem"], color="#E69F00", alpha=0.35,
                       label="control ± s.e.")
            ax.axhline(c["mean"], color="#E69F00", lw=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(TITLES[metric], fontsize=9)
    if "control" in table:  # above the panels, where it hides no bar
        fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
