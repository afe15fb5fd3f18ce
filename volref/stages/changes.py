"""What refinement changed, without ground truth: a "do no harm" signal for every run.

Per block, :func:`count_changes` counts integers — voxels, voxels whose class changed, initial
mitochondrion voxels (any class but background) and those of them refinement turned to
background; :func:`summarise_changes` sums them over the blocks, so the totals are the same for
any block shape and worker count, and gives the two shares a user reads:

* **changed**: the share of all voxels whose class refinement changed;
* **removed**: the share of the initial mitochondrion voxels it turned to background.

A refinement that repairs labels rebuilds patches *near* mitochondria; one that erases a large
part of what the ensemble called mitochondrion is more likely to be doing harm (in the low-SNR
spots the MAE exists to repair, the shipped MAE loses the faint mitochondrion's extent:
issue 21). Above :data:`REMOVED_WARN` the run warns (a log WARNING and a line in the summary).
How it was chosen (the shipped MAE on ``volref synth`` phantoms with and without low-SNR
spots): see :data:`REMOVED_WARN`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from volref.classes import BACKGROUND

#: above this share of the initial mitochondrion voxels turned to background, a run warns.
#: Chosen with the shipped MAE on ``volref synth`` phantoms (16 x 512 x 512, density 3, seed
#: 501, shipped ensemble): with no low-SNR spot it removes 0.5 % (changes 1.8 % of all voxels)
#: and does good — mitochondrion Dice against ground truth 0.956 -> 0.962; with a spot on every
#: mitochondrion (28 % of the voxels degraded) it removes 13.9 % (changes 8.0 %), 89 % of them
#: truly mitochondrion, and does harm — 0.840 -> 0.809, inside the spots 0.707 -> 0.614. On seed
#: 502 with the default share of spots (6 % of the voxels) it removes 1.8 % (changes 2.8 %):
#: 0.911 -> 0.918 (inside the spots 0.605 -> 0.589). 5 % lies between: about three times what
#: it removes where it does good overall, a third of what it removes where it does harm.
REMOVED_WARN = 0.05
#: blocks with fewer initial mitochondrion voxels are not flagged on their own (a share of a
#: few voxels says little); they still count in the totals
MIN_BLOCK_MITO = 1000
#: the blocks the summary names, the highest removed share first
WORST_BLOCKS = 5
COUNTS = ("voxels", "changed", "mitochondrion", "to_background")


def count_changes(initial: np.ndarray, refined: np.ndarray) -> dict[str, int]:
    """Integer counts of one block: ``voxels``, ``changed`` (class differs), ``mitochondrion``
    (initial non-background), ``to_background`` (initial mitochondrion, refined background).
    ``initial`` and ``refined``: the block's labels before and after, same shape."""
    if initial.shape != refined.shape:
        raise ValueError(f"initial {initial.shape} and refined {refined.shape} labels differ "
                         "in shape")
    mito = initial != BACKGROUND
    return {"voxels": int(initial.size), "changed": int(np.count_nonzero(initial != refined)),
            "mitochondrion": int(np.count_nonzero(mito)),
            "to_background": int(np.count_nonzero(mito & (refined == BACKGROUND)))}


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def summarise_changes(blocks: Mapping[str, Mapping[str, Any]],
                      threshold: float = REMOVED_WARN) -> dict[str, Any]:
    """The run's summary from the per-block records (``block key -> stats`` holding
    ``changes``, as :func:`count_changes` made them; records without it — blocks refined
    before volref counted — are counted as ``uncounted``). JSON-ready; ``warning`` is None or
    one sentence."""
    totals = dict.fromkeys(COUNTS, 0)
    per_block = []
    uncounted = 0
    for key in sorted(blocks):
        counts = blocks[key].get("changes") if isinstance(blocks[key], Mapping) else None
        if not isinstance(counts, Mapping):
            uncounted += 1
            continue
        for name in COUNTS:
            totals[name] += int(counts[name])
        if counts["mitochondrion"] >= MIN_BLOCK_MITO:
            per_block.append((_share(counts["to_background"], counts["mitochondrion"]),
                              _share(counts["changed"], counts["voxels"]), key))
    per_block.sort(key=lambda r: (-r[0], r[2]))
    over = [r for r in per_block if r[0] > threshold]
    removed = _share(totals["to_background"], totals["mitochondrion"])
    warning = None
    if removed > threshold or over:
        where = f"in total {removed:.1%}" if removed > threshold else \
            f"in {len(over)} block(s), up to {over[0][0]:.1%} (block {over[0][2]})"
        warning = (f"refinement turned {where} of the initial mitochondrion voxels to "
                   f"background, above {threshold:.0%}: it may be erasing mitochondria; look "
                   "at the refined labels (volref panel) before trusting them")
    return {**totals, "changed_share": _share(totals["changed"], totals["voxels"]),
            "removed_share": removed, "threshold": threshold,
            "blocks": len(blocks) - uncounted, "uncounted": uncounted,
            "blocks_over_threshold": len(over),
            "worst_blocks": [{"block": k, "removed_share": r, "changed_share": c}
                             for r, c, k in per_block[:WORST_BLOCKS]],
            "warning": warning}


def change_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary as the command line prints it."""
    lines = [f"refinement changed {summary['changed_share']:.2%} of {summary['voxels']} voxels "
             f"and turned {summary['removed_share']:.2%} of {summary['mitochondrion']} initial "
             "mitochondrion voxels to background"]
    worst = summary.get("worst_blocks") or []
    if worst:
        lines.append("most removed by block: " + ", ".join(
            f"{w['block']} {w['removed_share']:.1%}" for w in worst[:3]))
    if summary.get("uncounted"):
        lines.append(f"{summary['uncounted']} block(s) refined by an earlier volref are not "
                     "counted")
    if summary.get("warning"):
        lines.append(f"WARNING: {summary['warning']}")
    return lines
